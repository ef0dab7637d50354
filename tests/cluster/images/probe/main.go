// Command probe is the tiny, dependency-free test workload of the local
// cluster's smoke tests. It replaces a shell in a scratch image:
//
//	probe sleep SECONDS     sleep, then exit 0
//	probe echo WORDS...     print WORDS
//	probe dmesg             print the kernel log (syslog(2) READ_ALL); under gVisor it starts "Starting gVisor..."
//	probe connect HOST:PORT [RETRY_SECONDS]
//	                        try a TCP connection (5s timeout), retrying for up to RETRY_SECONDS;
//	                        print "connected" (exit 0) or the last error (exit 1)
//	probe serve ADDR        accept TCP connections on ADDR and answer "ok"
//	probe cat FILE          print FILE
package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: probe sleep|echo|dmesg|connect|serve|cat ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "sleep":
		secs := 3600.0
		if len(args) > 0 {
			v, err := strconv.ParseFloat(args[0], 64)
			if err != nil {
				fail("sleep: " + err.Error())
			}
			secs = v
		}
		time.Sleep(time.Duration(secs * float64(time.Second)))
	case "echo":
		fmt.Println(strings.Join(args, " "))
	case "dmesg":
		const readAll, sizeBuffer = 3, 10
		size, err := syscall.Klogctl(sizeBuffer, nil)
		if err != nil || size <= 0 {
			size = 1 << 16
		}
		buf := make([]byte, size)
		n, err := syscall.Klogctl(readAll, buf)
		if err != nil {
			fail("dmesg: " + err.Error())
		}
		os.Stdout.Write(buf[:n])
	case "connect":
		if len(args) < 1 || len(args) > 2 {
			fail("usage: probe connect HOST:PORT [RETRY_SECONDS]")
		}
		deadline := time.Now()
		if len(args) == 2 {
			secs, err := strconv.ParseFloat(args[1], 64)
			if err != nil {
				fail("connect: " + err.Error())
			}
			deadline = deadline.Add(time.Duration(secs * float64(time.Second)))
		}
		for {
			conn, err := net.DialTimeout("tcp", args[0], 5*time.Second)
			if err == nil {
				conn.Close()
				fmt.Println("connected")
				return
			}
			if time.Now().After(deadline) {
				fmt.Println("connect failed:", err)
				os.Exit(1)
			}
			time.Sleep(500 * time.Millisecond)
		}
	case "serve":
		if len(args) != 1 {
			fail("usage: probe serve ADDR")
		}
		ln, err := net.Listen("tcp", args[0])
		if err != nil {
			fail("serve: " + err.Error())
		}
		for {
			conn, err := ln.Accept()
			if err != nil {
				fail("serve: " + err.Error())
			}
			conn.Write([]byte("ok\n"))
			conn.Close()
		}
	case "cat":
		for _, f := range args {
			b, err := os.ReadFile(f)
			if err != nil {
				fail("cat: " + err.Error())
			}
			os.Stdout.Write(b)
		}
	default:
		fail("unknown command " + os.Args[1])
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(2)
}
