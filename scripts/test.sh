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
# openbsd-inetd: its built-in datagram echo serves the impairment matrix (tests/e2e_impairment.rs).
for pkg in dnsmasq-base socat openssh-server openssh-client netcat-openbsd iperf3 nftables iproute2 curl procps \
    openbsd-inetd \
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

step "all checks passed"
