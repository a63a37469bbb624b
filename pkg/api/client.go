package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Client talks to ctlbd over its unix socket. Each method is one API call;
// a non-2xx answer comes back as a *StatusError (match it with errors.Is
// against ErrNotFound, ErrConflict, ...), a daemon that cannot be reached as
// an error wrapping ErrUnreachable.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	return &Client{
		socket: socket,
		http: &http.Client{
			Timeout: 30 * time.Second,
			Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", socket)
				},
			},
		},
	}
}

// Socket is the path the client dials.
func (c *Client) Socket() string { return c.socket }

// SetService replaces a VIP's static servers and returns the set written.
func (c *Client) SetService(ctx context.Context, req ServiceRequest) (Service, error) {
	if req.Servers == nil {
		req.Servers = []string{}
	}
	var svc Service
	err := c.do(ctx, http.MethodPut, PathServices, req, &svc)
	return svc, err
}

// DeleteService removes a VIP; ErrNotFound if it was not configured.
func (c *Client) DeleteService(ctx context.Context, vip string) error {
	return c.do(ctx, http.MethodDelete, PathServices+"/"+url.PathEscape(vip), nil, nil)
}

// Services lists the VIPs as the maps hold them.
func (c *Client) Services(ctx context.Context) ([]Service, error) {
	var out []Service
	err := c.do(ctx, http.MethodGet, PathServices, nil, &out)
	return out, err
}

// Attach attaches ctlb to a cgroup v2 directory, or (req.Host) once at
// the cgroup v2 root.
func (c *Client) Attach(ctx context.Context, req AttachRequest) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, http.MethodPost, PathAttachments, req, &a)
	return a, err
}

// Detach removes every attachment on a cgroup (or the host-wide one) and
// returns them.
func (c *Client) Detach(ctx context.Context, req AttachRequest) ([]Attachment, error) {
	var out []Attachment
	err := c.do(ctx, http.MethodDelete, PathAttachments, req, &out)
	return out, err
}

// Attachments lists every attachment under the daemon's bpffs directory.
func (c *Client) Attachments(ctx context.Context) ([]Attachment, error) {
	var out []Attachment
	err := c.do(ctx, http.MethodGet, PathAttachments, nil, &out)
	return out, err
}

// Pending lists the pending attachments and their state.
func (c *Client) Pending(ctx context.Context) ([]PendingAttachment, error) {
	var out []PendingAttachment
	err := c.do(ctx, http.MethodGet, PathPending, nil, &out)
	return out, err
}

// NotifyPending tells the daemon that a pending record was written for
// containerID's attachment attachmentID; it answers with what it did about it.
func (c *Client) NotifyPending(ctx context.Context, containerID, attachmentID string) (PendingAttachment, error) {
	var out PendingAttachment
	err := c.do(ctx, http.MethodPost, PathPending, PendingNotice{ContainerID: containerID, AttachmentID: attachmentID}, &out)
	return out, err
}

// Status is ctlbd status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, PathStatus, nil, &st)
	return st, err
}

// Version is the daemon's version.
func (c *Client) Version(ctx context.Context) (Version, error) {
	var v Version
	err := c.do(ctx, http.MethodGet, PathVersion, nil, &v)
	return v, err
}

// Reload makes the daemon re-read its config file, as SIGHUP does.
func (c *Client) Reload(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, PathReload, nil, nil)
}

// Raw sends a body as it is, for callers that test the daemon's handling of
// malformed or oversized requests.
func (c *Client) Raw(ctx context.Context, method, path string, body []byte) error {
	return c.send(ctx, method, path, bytes.NewReader(body), nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	return c.send(ctx, method, path, body, out)
}

func (c *Client) send(ctx context.Context, method, path string, body io.Reader, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://ctlbd"+path, body)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %w", ErrUnreachable, c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		se := &StatusError{Code: resp.StatusCode}
		var e ErrorResponse
		if json.Unmarshal(data, &e) == nil {
			se.Message = e.Error
		}
		return se
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decode answer: %w", err)
		}
	}
	return nil
}
