#!/usr/bin/env bash
# Fetches what the v86 guest test (tests/e2e_v86.rs) boots, idempotently, into target/v86-guest
# (or $WEBNIC_V86_DIR): v86 from npm (emulator + wasm; it ships no BIOS or images) and three
# Debian i386 packages, downloaded and unpacked without installing them: the 686 kernel (whose
# ne2k-pci/8390 modules the test puts into its initramfs), busybox-static and seabios.
set -euo pipefail
cd "$(dirname "$0")/../.."

V86_VERSION=0.5.462
out=${WEBNIC_V86_DIR:-$PWD/target/v86-guest}
if [[ -f "$out/ready" && "$(cat "$out/ready")" == "v86 $V86_VERSION"* ]]; then
    echo "v86 guest assets present in $out"
    exit 0
fi
rm -rf "$out"
mkdir -p "$out/lists/partial" "$out/cache/archives/partial" "$out/debs" "$out/root"
apt_i386=(-oAPT::Architecture=i386 -oAPT::Architectures=i386 "-oDir::State::Lists=$out/lists"
    "-oDir::Cache=$out/cache" -oDebug::NoLocking=1)
# A mirror mid-sync can fail one index (e.g. security); the main one is what we need.
apt-get "${apt_i386[@]}" update -qq || echo "apt-get update reported errors; continuing with what it fetched"
kernel=$(apt-cache "${apt_i386[@]}" depends linux-image-686 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [[ -z "$kernel" ]]; then
    echo "no i386 kernel package found (apt-cache depends linux-image-686)" >&2
    exit 1
fi
(cd "$out/debs" && apt-get "${apt_i386[@]}" download "$kernel" busybox-static seabios)
for deb in "$out"/debs/*.deb; do
    dpkg-deb -x "$deb" "$out/root"
done
(cd "$out" && npm pack --silent "v86@$V86_VERSION" >/dev/null && tar xzf "v86-$V86_VERSION.tgz")
rm -rf "$out/lists" "$out/cache"
echo "v86 $V86_VERSION $kernel" > "$out/ready"
echo "v86 guest assets in $out: $(cat "$out/ready")"
