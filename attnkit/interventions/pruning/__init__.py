"""Token pruning: FastV, visual-token exit, VTC-CLS, DAMRO outliers, per-head KV retention (one file per method)."""
