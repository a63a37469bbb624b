// Command build-consul builds (once) the Consul binary the tests use and
// prints its path; tests build it themselves when it is missing, so this
// only moves the wait out of the first test.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"

	"github.com/ctlb/ctlb/test/consul"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	bin, err := consul.Build(ctx, log.Printf)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(bin)
}
