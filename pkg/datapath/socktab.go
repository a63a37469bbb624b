package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// SocketTable is how much of the socket table (docs/MAPS.md) sockets hold:
// one entry per VIP socket open now, unless its entry was another open
// socket's (its state then went to socket storage). Used entries far above
// the sockets open to every VIP mean entries whose socket closed without
// the root's sock_release running: they stay taken, and sockets falling on
// them use socket storage.
type SocketTable struct {
	Size int `json:"size"`
	Used int `json:"used"`
}

// socktabChunk bounds one batch lookup of the socket table (64 B each).
const socktabChunk = 4096

// SocketTable reads the socket table. ok is false for pins made by a ctlbd
// from before the table (docs/UPGRADE.md): every socket state is then in
// socket storage, which has no count.
func (d *Datapath) SocketTable() (st SocketTable, ok bool, err error) {
	m := d.maps.socktab
	if m == nil {
		return SocketTable{}, false, nil
	}
	size := int(m.MaxEntries())
	st.Size = size
	keys := make([]uint32, socktabChunk)
	vals := make([]ctlbSockEntryV2, socktabChunk)
	var cursor ebpf.MapBatchCursor
	for seen := 0; seen < size; {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			if seen == 0 && errors.Is(err, ebpf.ErrNotSupported) {
				return d.socketTableOneByOne(st)
			}
			return st, true, fmt.Errorf("read the socket table: %w", err)
		}
		for _, v := range vals[:n] {
			if v.Cookie != 0 {
				st.Used++
			}
		}
		seen += n
		if n == 0 || errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
	}
	return st, true, nil
}

// socketTableOneByOne is SocketTable for kernels without batch lookups of
// arrays.
func (d *Datapath) socketTableOneByOne(st SocketTable) (SocketTable, bool, error) {
	var k uint32
	var v ctlbSockEntryV2
	it := d.maps.socktab.Iterate()
	for it.Next(&k, &v) {
		if v.Cookie != 0 {
			st.Used++
		}
	}
	if err := it.Err(); err != nil {
		return st, true, fmt.Errorf("read the socket table: %w", err)
	}
	return st, true, nil
}
