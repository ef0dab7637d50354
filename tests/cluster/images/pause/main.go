// Command pause is the pod sandbox ("pause") process for the local test
// cluster: it holds the pod's namespaces, reaps orphaned children and exits
// cleanly on SIGINT/SIGTERM. Built statically and shipped in a scratch image
// because no registry with upstream's pause image is reachable here.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
