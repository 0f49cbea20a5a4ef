#!/usr/bin/env bash
# The ONNX Runtime C/C++ headers, from Debian 13's libonnxruntime-dev package, into
# third_party/onnxruntime/ (or $1). The library comes from the onnxruntime Python wheel; its C API
# is versioned (OrtGetApiBase()->GetApi(ORT_API_VERSION)), so these 1.21 headers work with a newer
# library. On Debian 13 itself `apt-get install libonnxruntime-dev` gives the same files.
#
# The .deb is fetched with apt-get from the Debian archive the machine's apt sources name (signature checked with the system's
# debian-archive-keyring) through a private apt state folder: the machine's own apt sources and
# package database are not touched and nothing is installed system-wide. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/third_party/onnxruntime}"
if [ -f "$dest/include/onnxruntime_cxx_api.h" ]; then exit 0; fi

state="${XDG_CACHE_HOME:-$HOME/.cache}/onnxcam-examples/apt-trixie"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/deb"
# The Debian archive this machine already uses (deb822 or one-line sources), for suite trixie.
archive="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
[ -n "$archive" ] || archive="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
[ -n "$archive" ] || { echo "fetch_headers.sh: no Debian archive in /etc/apt sources" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $archive trixie main" > "$state/sources.list"
apt_options=(-o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
             -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q)
if ! ls "$state"/deb/libonnxruntime-dev_*.deb >/dev/null 2>&1; then
  apt-get "${apt_options[@]}" update >/dev/null
  (cd "$state/deb" && apt-get "${apt_options[@]}" download libonnxruntime-dev)
fi
unpacked="$(mktemp -d)"
trap 'rm -rf "$unpacked"' EXIT
dpkg-deb -x "$state"/deb/libonnxruntime-dev_*.deb "$unpacked"
mkdir -p "$dest"
rm -rf "$dest/include.tmp" && cp -r "$unpacked/usr/include/onnxruntime" "$dest/include.tmp"
mv "$dest/include.tmp" "$dest/include"
echo "ONNX Runtime headers ($(basename "$state"/deb/libonnxruntime-dev_*.deb)) in $dest/include"
