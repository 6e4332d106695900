#!/usr/bin/env bash
# The one test command for webnic: installs what the tests need (idempotently),
# then runs fmt, clippy, the wasm32 build of the stack, the binaries and every test.
#
#   sudo scripts/test.sh                 # everything
#   sudo scripts/test.sh -- --nocapture  # extra args go to `cargo test --workspace`
#
# The end-to-end tests build network namespaces and veth pairs, so this must run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if [[ "$(id -u)" -ne 0 ]]; then
    echo "scripts/test.sh must run as root (the end-to-end tests create network namespaces): sudo scripts/test.sh" >&2
    exit 1
fi

# ---------------------------------------------------------------- dependencies
step "checking system packages"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
# Any nginx flavour will do; prefer the light one when installing.
if ! installed nginx-light && ! installed nginx && ! installed nginx-core && ! installed nginx-full \
    && ! command -v nginx >/dev/null 2>&1; then
    missing+=(nginx)
fi
# chromium and ngircd (IRC from the page): the browser end-to-end tests (tests/e2e_browser.rs).
# busybox (udhcpc, nslookup): the kernel guest behind `webnic tap` (tests/e2e_tap.rs).
# openbsd-inetd: its built-in datagram echo (impairment matrix, load test); openssl: certificates for the restart tests.
# conntrack: the gateway deletes flow entries of released addresses with it; the churn test checks the table.
for pkg in dnsmasq-base socat openssh-server openssh-client netcat-openbsd iperf3 nftables iproute2 curl procps \
    openbsd-inetd openssl conntrack \
    chromium ngircd busybox; do
    installed "$pkg" || missing+=("$pkg")
done
# Node drives Chromium (playwright-core); any install will do (nodesource's nodejs bundles npm).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if ((${#missing[@]} > 0)); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    for i in "${!missing[@]}"; do
        if [[ "${missing[$i]}" == nginx ]]; then
            if apt-cache show nginx-light >/dev/null 2>&1; then missing[$i]=nginx-light; fi
        fi
    done
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "all present"
fi

step "checking Rust toolchain"
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
for comp in rustfmt clippy; do
    if ! rustup component list --installed | grep -q "^${comp}"; then
        rustup component add "$comp"
    fi
done
# The fuzz targets (fuzz/) need nightly (sanitizer flags) and cargo-fuzz.
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi
echo "ok"

# ---------------------------------------------------------------- checks
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build -p webnic-stack --target wasm32-unknown-unknown"
cargo build -p webnic-stack --target wasm32-unknown-unknown

step "cargo build --workspace --bins"
cargo build --workspace --bins

step "scripts/build-wasm.sh (wasm-bindgen-cli, npm packages, the browser package)"
scripts/build-wasm.sh

step "tests/browser/v86-assets.sh (v86 from npm, Debian's i386 kernel, busybox-static and SeaBIOS for tests/e2e_v86.rs)"
tests/browser/v86-assets.sh

step "cargo test --workspace $*"
cargo test --workspace "$@"

# The vendored smoltcp is outside the workspace: its own unit tests (upstream's TCP suite, updated
# where webnic's patches change behaviour on purpose) guard the patches.
step "vendor/smoltcp unit tests (cargo test --lib)"
(cd vendor/smoltcp && cargo test --lib -q)

# Each fuzz target briefly (FUZZ_SECONDS, default 20); any crash fails the run. The long run is in
# docs/SECURITY.md.
fuzz_seconds="${FUZZ_SECONDS:-20}"
step "fuzz targets, ${fuzz_seconds} s each (cargo +nightly fuzz)"
(cd fuzz && cargo +nightly fuzz build)
mkdir -p target
for target in $(cd fuzz && cargo +nightly fuzz list); do
    log="target/fuzz-${target}.log"
    if ! (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="$fuzz_seconds") >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target ${target} crashed: the input is in fuzz/artifacts/${target}/" >&2
        exit 1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | awk '{print $2}')
    if [[ -z "$runs" ]]; then
        tail -40 "$log"
        echo "fuzz target ${target}: no run count in its output" >&2
        exit 1
    fi
    echo "${target}: ${runs} executions in ${fuzz_seconds} s, no crash"
done

step "all checks passed"
