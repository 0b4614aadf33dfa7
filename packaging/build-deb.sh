#!/usr/bin/env bash
# Builds the Debian package of Tessera: build-deb.sh [BINARY] [OUT_DIR]
#   BINARY   the tessera binary to package (default target/release/tessera: cargo build --release)
#   OUT_DIR  where tessera_VERSION_ARCH.deb is written (default target/debian)
# Needs dpkg-deb (Debian's dpkg). Prints the package's path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="${1:-$root/target/release/tessera}"
out="${2:-$root/target/debian}"
[ -x "$binary" ] || { echo "no binary at $binary: run cargo build --release" >&2; exit 1; }
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$binary" "$stage/usr/bin/tessera"
install -D -m 0644 "$root/packaging/debian/tessera.service" "$stage/lib/systemd/system/tessera.service"
install -D -m 0640 "$root/packaging/debian/tessera.toml" "$stage/etc/tessera/tessera.toml"
install -D -m 0644 "$root/docs/install.md" "$stage/usr/share/doc/tessera/install.md"
install -D -m 0644 "$root/README.md" "$stage/usr/share/doc/tessera/README.md"
mkdir -p "$stage/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$root/packaging/debian/$script" "$stage/DEBIAN/$script"
done
echo "/etc/tessera/tessera.toml" > "$stage/DEBIAN/conffiles"
size="$(du -sk "$stage" | cut -f1)"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: tessera
Version: $version
Architecture: $arch
Maintainer: Tessera developers <tessera@localhost>
Installed-Size: $size
Depends: libc6, adduser | passwd
Section: net
Priority: optional
Homepage: https://tessera.invalid
Description: Tessera license server
 Leases vendor-signed licenses to stations; runs alone, as a domain of up to
 20 hosts or as a redundant pair. Runs as the systemd service tessera.
CONTROL
mkdir -p "$out"
package="$out/tessera_${version}_${arch}.deb"
# TESSERA_DEB_COMPRESS=gzip builds faster (the tests use it); the default is dpkg-deb's (xz).
dpkg-deb --root-owner-group ${TESSERA_DEB_COMPRESS:+-Z"$TESSERA_DEB_COMPRESS"} --build "$stage" "$package" >/dev/null
echo "$package"
