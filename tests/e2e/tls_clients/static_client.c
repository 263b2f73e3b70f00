/* A CRM connector linked statically against OpenSSL (libssl.a, libcrypto.a):
 * its SSL_write lives in the executable, not in a shared libssl.
 *
 * usage: static_client IP SNI BODY
 * Prints "started", waits for a line on stdin, opens one TLS connection to
 * IP:443 naming SNI, posts BODY in one SSL_write and reads the answer; then
 * prints "sent" and keeps the connection open until stdin ends (so that its
 * owner can be looked up by its socket). Exit 0 on a 200 answer. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what)
{
	fprintf(stderr, "static_client: %s\n", what);
	return 1;
}

int main(int argc, char **argv)
{
	char line[64], req[4096], resp[512];
	struct sockaddr_in crm = { .sin_family = AF_INET, .sin_port = htons(443) };
	int fd, n;

	if (argc != 4 || inet_pton(AF_INET, argv[1], &crm.sin_addr) != 1)
		return fail("usage: static_client IP SNI BODY");
	printf("started\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return fail("no go");

	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	if (!ctx)
		return fail("SSL_CTX_new");
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL); /* the lab's self-signed CRM */
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&crm, sizeof(crm)) != 0)
		return fail("connect");
	SSL *ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	SSL_set_tlsext_host_name(ssl, argv[2]);
	if (SSL_connect(ssl) != 1)
		return fail("handshake");
	n = snprintf(req, sizeof(req),
		     "POST /services/data/v59.0/sobjects/Account HTTP/1.1\r\nHost: %s\r\n"
		     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
		     argv[2], strlen(argv[3]), argv[3]);
	if (n <= 0 || n >= (int)sizeof(req) || SSL_write(ssl, req, n) != n)
		return fail("SSL_write");
	n = SSL_read(ssl, resp, sizeof(resp) - 1);
	if (n <= 0)
		return fail("SSL_read");
	resp[n] = 0;
	if (!strstr(resp, " 200"))
		return fail("not 200");
	printf("sent\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin))
		;
	SSL_shutdown(ssl);
	close(fd);
	return 0;
}
