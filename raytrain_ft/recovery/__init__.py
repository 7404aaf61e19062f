"""Recovery: command log, snapshots and replay (pure), fault injection (Ray)."""
