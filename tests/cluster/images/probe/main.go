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
//	probe tree DIR          one JSON line per entry under DIR (path, type, mode, uid, gid,
//	                        size, sha256 of files), then {"mount": ...} with DIR's mount
//	                        options from /proc/self/mountinfo
//	probe write FILE        try to create FILE; print "written" or the error (exit 0 either way)
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: probe sleep|echo|dmesg|connect|serve|cat|tree|write ...")
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
	case "tree":
		if len(args) != 1 {
			fail("usage: probe tree DIR")
		}
		tree(args[0])
	case "write":
		if len(args) != 1 {
			fail("usage: probe write FILE")
		}
		if err := os.WriteFile(args[0], []byte("x"), 0o644); err != nil {
			fmt.Println("write failed:", err)
		} else {
			fmt.Println("written")
		}
	default:
		fail("unknown command " + os.Args[1])
	}
}

func tree(root string) {
	enc := json.NewEncoder(os.Stdout)
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := os.Lstat(path)
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		rel, _ := filepath.Rel(root, path)
		e := map[string]any{
			"path": rel, "type": kind(info.Mode()), "mode": fmt.Sprintf("%04o", info.Mode().Perm()),
			"uid": st.Uid, "gid": st.Gid, "size": info.Size(),
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(path)
			if err != nil {
				e["error"] = err.Error()
			} else {
				h := sha256.New()
				_, err = io.Copy(h, f)
				f.Close()
				if err != nil {
					e["error"] = err.Error()
				} else {
					e["sha256"] = hex.EncodeToString(h.Sum(nil))
				}
			}
		}
		return enc.Encode(e)
	})
	if err != nil {
		fail("tree: " + err.Error())
	}
	// mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE SUPEROPTIONS
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		fail("tree: " + err.Error())
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[4] != filepath.Clean(root) {
			continue
		}
		m := map[string]any{"mountpoint": fields[4], "options": fields[5]}
		for i, fld := range fields {
			if fld == "-" && i+3 < len(fields) {
				m["fstype"], m["source"], m["superoptions"] = fields[i+1], fields[i+2], fields[i+3]
			}
		}
		enc.Encode(map[string]any{"mount": m})
	}
}

func kind(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "file"
	case m.IsDir():
		return "dir"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	}
	return "other"
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(2)
}
