package config_test

import (
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// TestProtocolAndBalance: "protocol" and "balance" reach the datapath's
// service; a TCP and a UDP VIP on one address and port are two VIPs; bad
// values are refused naming the value.
func TestProtocolAndBalance(t *testing.T) {
	c, err := config.Parse([]byte(`{"services": [
		{"vip": "198.19.0.53:8600", "servers": ["127.0.0.1:8600"], "protocol": "udp"},
		{"vip": "198.19.0.53:8600", "servers": ["127.0.0.1:8600"], "balance": "least-open"},
		{"vip": "[2001:2::100]:8502", "servers": ["[2001:2::11]:8502"], "balance": "random"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		proto   datapath.Protocol
		balance datapath.Balance
	}{{datapath.UDP, datapath.BalanceRoundRobin}, {datapath.TCP, datapath.BalanceLeastOpen}, {datapath.TCP, datapath.BalanceRandom}}
	for i, s := range c.Services {
		svc, err := s.Datapath()
		if err != nil {
			t.Fatal(err)
		}
		if svc.Protocol != want[i].proto || svc.Balance != want[i].balance {
			t.Errorf("services[%d] = %s %s, want %s %s", i, svc.Protocol, svc.Balance, want[i].proto, want[i].balance)
		}
	}
	bad := map[string]string{
		`{"services": [{"vip": "198.19.0.1:80", "protocol": "sctp"}]}`:                                             `protocol "sctp"`,
		`{"services": [{"vip": "198.19.0.1:80", "balance": "fastest"}]}`:                                           `balance "fastest"`,
		`{"services": [{"vip": "198.19.0.1:0", "protocol": "udp"}]}`:                                               "198.19.0.1:0",
		`{"services": [{"vip": "[2001:2::1]:80", "servers": ["127.0.0.1:80"]}]}`:                                   "of one family",
		`{"services": [{"vip": "[::ffff:198.19.0.1]:80"}]}`:                                                        "v4-mapped",
		`{"services": [{"vip": "198.19.0.1:80", "protocol": "udp"}, {"vip": "198.19.0.1:80", "protocol": "udp"}]}`: "198.19.0.1:80/udp is configured twice",
	}
	for in, w := range bad {
		if _, err := config.Parse([]byte(in)); err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("Parse(%s) = %v, want an error naming %s", in, err, w)
		}
	}
}
