// A CRM connector written in Go for the plaintext tests (issue 13.1): stdlib
// only, built from source by the test with the distribution's toolchain.
//
//	go_client URL HOST BODY [COUNT]
//
// prints "started", waits for a line on stdin (the test first waits for the
// monitor to probe it), then POSTs BODY (application/json) COUNT times (default
// 1) to URL over one HTTPS connection with Host: HOST, reads each response
// whole and prints "status <code> <response bytes>" per request. With
// GO_CLIENT_HOLD set it then prints "held" and keeps its (idle, pooled)
// connection open until a second line arrives.
// Certificates are not verified: the test's server has a throwaway one.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: go_client URL HOST BODY [COUNT]")
		os.Exit(2)
	}
	url, host, body := os.Args[1], os.Args[2], []byte(os.Args[3])
	count := 1
	if len(os.Args) > 4 {
		n, err := strconv.Atoi(os.Args[4])
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, "COUNT must be a positive integer")
			os.Exit(2)
		}
		count = n
	}
	fmt.Println("started")
	stdin := bufio.NewReader(os.Stdin)
	if _, err := stdin.ReadString('\n'); err != nil {
		fmt.Fprintln(os.Stderr, "stdin:", err)
		os.Exit(1)
	}
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // throwaway test certificate
	}}
	for i := 0; i < count; i++ {
		req, err := http.NewRequest("POST", url, bytes.NewReader(body))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		req.Host = host
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Printf("status %d %d\n", resp.StatusCode, len(got))
	}
	if os.Getenv("GO_CLIENT_HOLD") != "" {
		fmt.Println("held")
		stdin.ReadString('\n')
	}
}
