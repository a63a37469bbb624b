// Command pause is the pod sandbox's process in the end-to-end tests: it
// holds the pod's namespaces open and does nothing until it is told to stop,
// like Kubernetes' pause image, but built here from source (no registry).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	// As PID 1 of a pod it may inherit orphans: reap them so none lingers as
	// a zombie.
	signal.Notify(sigs, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
