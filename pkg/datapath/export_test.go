package datapath

// ForceParallel makes SetServices use single concurrent updates, as on a
// kernel without batch updates of HASH_OF_MAPS (tests compare the two).
func ForceParallel(d *Datapath) {
	d.batchMu.Lock()
	d.noBatch = true
	d.batchMu.Unlock()
}
