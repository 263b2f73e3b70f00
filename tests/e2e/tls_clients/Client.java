// A CRM connector on Java's own TLS (JSSE): no native TLS library to probe.
// usage: java Client.java IP SNI BODY: prints "started", waits for a line on
// stdin, posts BODY over one TLS connection to IP:443 naming SNI, prints "sent"
// after a 200 and keeps the connection open until stdin ends.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.security.cert.X509Certificate;
import java.util.List;
import javax.net.ssl.SNIHostName;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManager;
import javax.net.ssl.X509TrustManager;

public class Client {
    public static void main(String[] args) throws Exception {
        String ip = args[0], sni = args[1], body = args[2];
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        System.out.println("started");
        System.out.flush();
        in.readLine();
        TrustManager[] trustAll = { new X509TrustManager() {  // the lab's self-signed CRM
            public void checkClientTrusted(X509Certificate[] c, String a) {}
            public void checkServerTrusted(X509Certificate[] c, String a) {}
            public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; }
        } };
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, trustAll, null);
        try (SSLSocket s = (SSLSocket) ctx.getSocketFactory().createSocket(ip, 443)) {
            SSLParameters p = s.getSSLParameters();
            p.setServerNames(List.of(new SNIHostName(sni)));
            s.setSSLParameters(p);
            byte[] payload = body.getBytes(StandardCharsets.UTF_8);
            String head = "POST /services/data/v59.0/sobjects/Account HTTP/1.1\r\nHost: " + sni
                + "\r\nContent-Type: application/json\r\nContent-Length: " + payload.length
                + "\r\n\r\n";
            OutputStream out = s.getOutputStream();
            out.write(head.getBytes(StandardCharsets.US_ASCII));
            out.write(payload);
            out.flush();
            byte[] answer = new byte[512];
            int n = s.getInputStream().read(answer);
            if (n <= 0 || !new String(answer, 0, n, StandardCharsets.US_ASCII).contains(" 200")) {
                System.err.println("no 200 answer");
                System.exit(1);
            }
            System.out.println("sent");
            System.out.flush();
            while (in.readLine() != null) { }
        }
    }
}
