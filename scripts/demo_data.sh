#!/usr/bin/env bash
# Prints the data folder for `make demo`: LMRC_DATA_DIR when set, else ../shared/data beside the checkout when it
# holds the split, else a folder under the lmrc cache made from the
# official Re-DocRED dev file (downloaded by `lmrc data fetch`) split as these machines' shared data is:
# dev_50.json / train_450.json (seed 13), plus DocRED's relation inventory, checked by its sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${LMRC_DATA_DIR:-}" ] && [ -f "$LMRC_DATA_DIR/redocred/dev_50.json" ]; then
  echo "$LMRC_DATA_DIR"; exit 0
fi
# The shared data beside the checkout (as the Makefile finds it), for a shell without LMRC_DATA_DIR.
if [ -z "${LMRC_DATA_DIR:-}" ] && [ -f ../shared/data/redocred/dev_50.json ]; then
  (cd ../shared/data && pwd); exit 0
fi
LMRC=${LMRC:-.venv/bin/lmrc}
PY=${PY:-.venv/bin/python}
DATA=${LMRC_CACHE:-$HOME/.cache/lmrc}/data
OUT=$DATA/redocred
REL_INFO_URL=${LMRC_REL_INFO_URL:-https://raw.githubusercontent.com/YoumiMa/dreeam/main/meta/rel_info.json}
REL_INFO_SHA256=5ecf4e5e55c179fc83a3a3d19baa01efffecb26ba5edc0b4ac5a54ddf61fe3de
mkdir -p "$OUT"
if [ ! -f "$OUT/dev_50.json" ]; then
  "$LMRC" -q data fetch redocred --files dev --to "$OUT" >&2
  "$LMRC" -q data split "$OUT/dev_revised.json" --ratios 0.1,0.9 --seed 13 --out-dir "$OUT" >&2
  mv "$OUT/dev_revised_split0.json" "$OUT/dev_50.json"
  mv "$OUT/dev_revised_split1.json" "$OUT/train_450.json"
fi
if [ ! -f "$OUT/rel_info.json" ]; then
  "$PY" - "$REL_INFO_URL" "$OUT/rel_info.json" "$REL_INFO_SHA256" >&2 <<'PY'
import hashlib, os, sys, urllib.request
url, path, sha = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=60).read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"{url}: unexpected content (sha256 mismatch); put DocRED's rel_info.json into {path} by hand")
tmp = path + ".tmp"
open(tmp, "wb").write(data)
os.replace(tmp, path)
PY
fi
echo "$DATA"
