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

// TestIPv6VIPTracking: an IPv6 VIP with a source or health checks could
// never get a server (the tracker serves IPv4 VIPs only): it is refused,
// naming the service and the section. An IPv6 VIP with static servers and
// no health stays accepted, its servers as given.
func TestIPv6VIPTracking(t *testing.T) {
	const hint = `sources and health checks serve IPv4 VIPs only; give an IPv6 VIP static "servers" without "health"`
	pre := `{"services": [{"vip": "198.19.0.1:80", "servers": ["127.0.0.1:80"]}, {"vip": "[2001:2::20]:80", `
	cases := map[string]string{
		`"dns": {"name": "web.test", "resolver": "127.0.0.53"}}]}`:                    "config services[1]: VIP [2001:2::20]:80: dns: " + hint,
		`"consul": {"address": "http://127.0.0.1:8500", "service": "web"}}]}`:         "config services[1]: VIP [2001:2::20]:80: consul: " + hint,
		`"exec": {"command": ["/bin/true"]}}]}`:                                       "config services[1]: VIP [2001:2::20]:80: exec: " + hint,
		`"servers": ["[2001:2::11]:80"], "health": {"type": "tcp"}}]}`:                "config services[1]: VIP [2001:2::20]:80: health: " + hint,
		`"servers": ["[2001:2::11]:80"], "health": {"type": "tcp"}, "panic": true}]}`: "config services[1]: VIP [2001:2::20]:80: health: " + hint,
	}
	for in, want := range cases {
		_, err := config.Parse([]byte(pre + in))
		if err == nil || err.Error() != want {
			t.Errorf("Parse(%s)\n = %v\nwant %s", pre+in, err, want)
		}
	}
	c, err := config.Parse([]byte(pre + `"servers": ["[2001:2::11]:80", "[2001:2::12]:80"]}]}`))
	if err != nil {
		t.Fatalf("IPv6 VIP with static servers: %v", err)
	}
	svc, err := c.Services[1].Datapath()
	if err != nil || c.Services[1].Tracked() || len(svc.Servers) != 2 || svc.Servers[0].String() != "[2001:2::11]:80" {
		t.Errorf("IPv6 VIP with static servers: tracked %v, %+v, %v", c.Services[1].Tracked(), svc, err)
	}
}
