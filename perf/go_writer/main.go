// The Go TLS writer of perf/bench_go_plaintext.py (issue 13.4): stdlib only.
//
//	go_writer serve ADDR          TLS server (throwaway self-signed key made at
//	                              start): after each handshake it discards the
//	                              connection's raw bytes without decrypting them
//	                              (the writer is what is measured: a cheap reader
//	                              leaves the CPU to it); prints "ready"
//	go_writer write ADDR SECONDS  dials ADDR, prints "ready", waits for a line on
//	                              stdin (probes are attached to its pid first),
//	                              writes 4 KiB through tls.Conn.Write for SECONDS
//	                              and prints how many writes it made
//
// The reader is a process of its own so that the writer's pid-scoped probes
// cover only the writer's calls, as in bench_plaintext.py's forked reader.
package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"strconv"
	"time"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func serve(addr string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		fail(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fail(err)
	}
	fmt.Println("ready")
	for {
		c, err := ln.Accept()
		if err != nil {
			fail(err)
		}
		go func(c net.Conn) {
			if err := tls.Server(c, cfg).Handshake(); err == nil {
				io.Copy(io.Discard, c) // the records, still encrypted
			}
			c.Close()
		}(c)
	}
}

func write(addr string, seconds float64) {
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // throwaway key
	if err != nil {
		fail(err)
	}
	if err := c.Handshake(); err != nil {
		fail(err)
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fail(err)
	}
	block := make([]byte, 4096)
	for i := range block {
		block[i] = 'x'
	}
	n := 0
	end := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	for time.Now().Before(end) {
		for i := 0; i < 64; i++ {
			if _, err := c.Write(block); err != nil {
				fail(err)
			}
		}
		n += 64
	}
	fmt.Println(n)
	c.Close()
}

func main() {
	if len(os.Args) >= 3 && os.Args[1] == "serve" {
		serve(os.Args[2])
		return
	}
	if len(os.Args) >= 4 && os.Args[1] == "write" {
		seconds, err := strconv.ParseFloat(os.Args[3], 64)
		if err != nil {
			fail(err)
		}
		write(os.Args[2], seconds)
		return
	}
	fmt.Fprintln(os.Stderr, "usage: go_writer serve ADDR | write ADDR SECONDS")
	os.Exit(2)
}
