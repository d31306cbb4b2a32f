"""Documents, relation inventories and candidates files (no torch models here)."""
