// Package vip makes VIPs local on a node: each VIP is a /32 address on a
// device, so the node delivers packets for it to local sockets (the fallback
// proxy) and pods reach it through their default route.
//
// The kernel here has no dummy link type, so the device is a bridge with no
// ports (created when missing) or lo. The addresses ctlb adds carry the label
// "<device>:ctlb", so Sync can remove stale VIPs without touching addresses
// someone else put on the same device.
package vip

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// DefaultDevice is the bridge created to hold VIPs when no device is named.
const DefaultDevice = "ctlb0"

// labelSuffix marks addresses ctlb owns. IFA_LABEL must start with the
// device name and fit in IFNAMSIZ, so device names are at most
// MaxDeviceName bytes.
const labelSuffix = ":ctlb"

// MaxDeviceName is the longest device name whose owner label still fits.
const MaxDeviceName = 15 - len(labelSuffix)

// Device is the link that holds VIPs in one network namespace.
type Device struct {
	name  string
	label string
	h     *netlink.Handle
	index int
}

// ValidDeviceName says why name cannot hold VIPs, or nil.
func ValidDeviceName(name string) error {
	switch {
	case name == "":
		return errors.New("empty device name")
	case len(name) > MaxDeviceName:
		return fmt.Errorf("device name %q longer than %d bytes", name, MaxDeviceName)
	case name == "." || name == "..":
		return fmt.Errorf("device name %q not allowed", name)
	}
	for _, r := range name {
		if r <= ' ' || r == '/' || r == ':' || r > '~' {
			return fmt.Errorf("device name %q has a character not allowed in a link name", name)
		}
	}
	return nil
}

// Open finds the device name in the network namespace at netnsPath (""
// means the caller's), creating it as a bridge with no ports when it does not
// exist, and sets it up. Any existing device is used as it is.
func Open(name, netnsPath string) (*Device, error) {
	if err := ValidDeviceName(name); err != nil {
		return nil, err
	}
	h, err := handle(netnsPath)
	if err != nil {
		return nil, err
	}
	d := &Device{name: name, label: name + labelSuffix, h: h}
	l, err := h.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := h.LinkAdd(br); err != nil && !errors.Is(err, syscall.EEXIST) {
			h.Close()
			return nil, fmt.Errorf("create bridge %s for VIPs: %w", name, err)
		}
		l, err = h.LinkByName(name)
	}
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("find VIP device %s: %w", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		h.Close()
		return nil, fmt.Errorf("set VIP device %s up: %w", name, err)
	}
	d.index = l.Attrs().Index
	return d, nil
}

func handle(netnsPath string) (*netlink.Handle, error) {
	if netnsPath == "" {
		h, err := netlink.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("netlink: %w", err)
		}
		return h, nil
	}
	nsh, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %s: %w", netnsPath, err)
	}
	return h, nil
}

// Name is the device's name.
func (d *Device) Name() string { return d.name }

// Add puts vip on the device as a /32. Adding a VIP already there is not an
// error.
func (d *Device) Add(vip netip.Addr) error {
	a, err := d.addr(vip)
	if err != nil {
		return err
	}
	if err := d.h.AddrAdd(d.link(), a); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add VIP %s to %s: %w", vip, d.name, err)
	}
	return nil
}

// Remove takes vip off the device. Removing a VIP not there is not an error.
func (d *Device) Remove(vip netip.Addr) error {
	a, err := d.addr(vip)
	if err != nil {
		return err
	}
	err = d.h.AddrDel(d.link(), a)
	if err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.ENOENT) {
		return fmt.Errorf("remove VIP %s from %s: %w", vip, d.name, err)
	}
	return nil
}

// List returns the VIPs ctlb put on the device (its labelled /32s).
func (d *Device) List() ([]netip.Addr, error) {
	addrs, err := d.h.AddrList(d.link(), netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", d.name, err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		ones, bits := a.Mask.Size()
		if a.Label != d.label || ones != 32 || bits != 32 {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			out = append(out, ip)
		}
	}
	return out, nil
}

// Sync makes the VIPs on the device exactly want: it adds the missing ones
// and removes the ones ctlb added earlier that are no longer wanted.
func (d *Device) Sync(want []netip.Addr) error {
	have, err := d.List()
	if err != nil {
		return err
	}
	var errs []error
	for _, v := range want {
		if !slices.Contains(have, v) {
			errs = append(errs, d.Add(v))
		}
	}
	for _, v := range have {
		if !slices.Contains(want, v) {
			errs = append(errs, d.Remove(v))
		}
	}
	return errors.Join(errs...)
}

// Close releases the netlink handle. The device and its VIPs stay: a VIP
// that is local but has no proxy behind it refuses connections at once,
// where a VIP that disappears sends them down the default route to wait.
func (d *Device) Close() error {
	d.h.Close()
	return nil
}

func (d *Device) link() netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: d.name, Index: d.index}}
}

func (d *Device) addr(vip netip.Addr) (*netlink.Addr, error) {
	vip = vip.Unmap()
	if !vip.Is4() {
		return nil, fmt.Errorf("VIP %q: not an IPv4 address", vip)
	}
	b := vip.As4()
	return &netlink.Addr{
		IPNet: &net.IPNet{IP: net.IP(b[:]), Mask: net.CIDRMask(32, 32)},
		Label: d.label,
	}, nil
}
