package consul

import (
	"testing"
	"time"
)

// TestCluster checks the helper itself: three servers elect a leader and
// list each other; a killed follower leaves the passing list; restarted, it
// comes back.
func TestCluster(t *testing.T) {
	c := StartCluster(t, 3)
	leader, err := c.Leader()
	if err != nil {
		t.Fatalf("leader: %v", err)
	}
	t.Logf("leader %s (%s)", leader.Name, leader.Addr)
	var follower *Server
	for _, s := range c.Servers() {
		if s != leader {
			follower = s
			break
		}
	}
	var rest []*Server
	for _, s := range c.Servers() {
		if s != follower {
			rest = append(rest, s)
		}
	}
	start := time.Now()
	follower.Stop()
	c.WaitPassing(30*time.Second, rest...)
	t.Logf("killed follower %s left the passing list after %s", follower.Name, time.Since(start).Round(time.Millisecond))
	follower.Start()
	c.WaitPassing(30*time.Second, c.Servers()...)
	t.Logf("restarted follower %s passing again after %s", follower.Name, time.Since(start).Round(time.Millisecond))
}
