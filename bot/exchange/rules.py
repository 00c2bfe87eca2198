"""What the exchange accepts, stated without importing ccxt (so paper and replay never load it)."""

from __future__ import annotations

import re

# Binance's `newClientOrderId` pattern (the exchange accepts `.` as well; ritmo's own ids never use it).
CLIENT_ORDER_ID_RE = re.compile(r"^[.A-Za-z0-9_-]{1,36}$")
