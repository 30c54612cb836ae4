#!/usr/bin/env bash
# Writes a second evaluation text that no calibration sees: the King James Version of the Bible
# (1611, public domain), from Debian's bible-kjv-text (the compressed text) and bible-kjv (the
# `bible` reader that decompresses it). Both .deb files are fetched with `apt-get download` and
# unpacked with `dpkg-deb -x` into a temporary directory: nothing is installed system-wide.
#   out: $DATA/kjv/kjv.txt (one verse a line, verse numbers dropped, "Genesis 1"-style chapter
#   headings kept) and $DATA/kjv/copyright (the package's license file, which states the text's
#   status). DATA defaults to ../shared/data beside the checkout, never the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=$DATA/kjv
if [ -s "$OUT/kjv.txt" ]; then echo "$OUT/kjv.txt exists"; exit 0; fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download bible-kjv-text bible-kjv >/dev/null 2>&1) \
    || { echo "error: apt-get download bible-kjv-text bible-kjv failed (Debian's sources reachable?)" >&2; exit 1; }
for deb in "$TMP"/*.deb; do dpkg-deb -x "$deb" "$TMP/root"; done
grep -q "copyright for the King James Version text of the Bible is expired" \
    "$TMP/root/usr/share/doc/bible-kjv-text/copyright" \
    || { echo "error: bible-kjv-text's copyright file no longer states the text's status: read it" >&2; exit 1; }
mkdir -p "$OUT.tmp"
"$TMP/root/usr/bin/bible" -l100000 -p "$TMP/root/usr/lib" "gen1:1-rev22:21" \
    | sed -E 's/^ *[0-9]+ //' > "$OUT.tmp/kjv.txt"
cp "$TMP/root/usr/share/doc/bible-kjv-text/copyright" "$OUT.tmp/copyright"
[ "$(wc -c < "$OUT.tmp/kjv.txt")" -gt 4000000 ] || { echo "error: the decompressed text is too short" >&2; exit 1; }
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "wrote $OUT/kjv.txt ($(wc -c < "$OUT/kjv.txt") bytes; license: $OUT/copyright)"
