#!/usr/bin/env bash
# Builds the Debian package: target/debian/rollbackd_<version>_<arch>.deb.
#
#   config/deb/build.sh [--no-build] [--assets-only | --no-assets] [CARGO-DEB ARGS...]
#
# 1. cargo build --release --locked (skipped with --no-build);
# 2. the generated assets, into target/deb-assets/ (cargo-deb packages files that exist):
#    the man pages (`rollbackd man --dir`, gzipped), the bash/zsh/fish completions
#    (`rollbackd completions`), the packaged unit (config/rollbackd.service with
#    ExecStart=/usr/bin/rollbackd and the manual install steps replaced by a note), and the
#    conffile (config/rollbackd.example.toml with the packaged state_dir and an absolute
#    kill_switch.database); --assets-only stops here, --no-assets skips this step;
# 3. cargo deb --no-build with the remaining arguments (e.g. --deb-version 0.1.0-2,
#    --output DIR, --fast). The package's contents are [package.metadata.deb] in Cargo.toml.
#
# RBD_DEB_PROFILE=dev packages the debug build (target/debug/rollbackd) instead:
# CI's package test uses it to reuse the binary `cargo test` built rather than spend most
# of its time on a second, optimised build. Hosts get the release build (the default).
#
# Needs cargo-deb (`cargo install cargo-deb --locked`) for step 3 and dpkg-shlibdeps
# (package dpkg-dev) for the package's library dependencies.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

build=1 assets=1 package=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0; shift ;;
    --assets-only) package=0; shift ;;
    --no-assets) assets=0; shift ;;
    *) break ;;
  esac
done

profile=${RBD_DEB_PROFILE:-release}
case "$profile" in
  release) profile_dir=release; build_args=(--release) ;;
  dev) profile_dir=debug; build_args=() ;;
  *) echo "build.sh: RBD_DEB_PROFILE must be release or dev, not '$profile'" >&2; exit 1 ;;
esac

if [ "$build" = 1 ]; then
  echo "== cargo build ${build_args[*]} --locked"
  cargo build "${build_args[@]}" --locked
fi

# The binary cargo built (CARGO_TARGET_DIR or a configured target dir move it; cargo-deb
# itself resolves "target/release/" in the asset list the same way).
target_dir=$(cargo metadata --format-version 1 --no-deps \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="${target_dir:-$repo/target}/$profile_dir/rollbackd"
[ -x "$bin" ] || { echo "build.sh: no $bin: build it first (cargo build ${build_args[*]} --locked)" >&2; exit 1; }

if [ "$assets" = 1 ]; then
  out="$repo/target/deb-assets"
  echo "== assets into ${out#"$repo"/}"
  rm -rf "$out"
  mkdir -p "$out/man" "$out/completions"

  "$bin" man --dir "$out/man" >/dev/null
  [ -s "$out/man/rollbackd.1" ] || { echo "build.sh: rollbackd man wrote no rollbackd.1" >&2; exit 1; }
  gzip -9n "$out"/man/*.1 # Debian policy 12.1: man pages compressed with gzip -9n

  "$bin" completions bash >"$out/completions/rollbackd.bash"
  "$bin" completions zsh >"$out/completions/_rollbackd"
  "$bin" completions fish >"$out/completions/rollbackd.fish"

  # The unit: the repository's, but for the packaged binary, with the header's manual
  # install steps (everything before the first blank line) replaced by a packaged note.
  {
    cat <<'EOF'
# systemd unit for rollbackd, installed by the rollbackd Debian package.
# Change it with a drop-in, not here (the package owns this file): `systemctl edit rollbackd`,
# e.g. [Service] ReadWritePaths= for the application's database directory and whatever the
# rollback hooks write. Configuration: /etc/rollbackd/rollbackd.toml.
EOF
    sed -e '1,/^$/{/^$/!d}' -e 's|/usr/local/bin/rollbackd|/usr/bin/rollbackd|g' config/rollbackd.service
  } >"$out/rollbackd.service"
  grep -qx 'ExecStart=/usr/bin/rollbackd --config /etc/rollbackd/rollbackd.toml run' "$out/rollbackd.service" \
    || { echo "build.sh: the packaged unit's ExecStart is not /usr/bin/rollbackd (config/rollbackd.service changed?)" >&2; exit 1; }
  if grep -q '/usr/local/bin/rollbackd' "$out/rollbackd.service"; then
    echo "build.sh: the packaged unit still names /usr/local/bin/rollbackd" >&2; exit 1
  fi

  # The conffile: the example with every key and its documentation, with the two paths a
  # package must set (the working directory's "state" is not where a host keeps state).
  {
    cat <<'EOF'
# /etc/rollbackd/rollbackd.toml, installed by the rollbackd Debian package (a conffile:
# upgrades keep your edits). The shipped version is /usr/share/rollbackd/rollbackd.toml;
# the package does not start rollbackd while this file is identical to it.
#
# Edit for this host at least: [worker] (how the active worker is probed), [operations]
# (where the error rate comes from), [rollback] switch_command, [kill_switch] database
# (and allow its directory in the unit: `systemctl edit rollbackd`, ReadWritePaths=). Then:
#   rollbackd --config /etc/rollbackd/rollbackd.toml check-config --for run
#   systemctl start rollbackd
#
EOF
    sed -e 's|^state_dir = "state"$|state_dir = "/var/lib/rollbackd"|' \
        -e 's|^database = "state/orchestrator.db"$|database = "/var/lib/app/app.db"|' \
        config/rollbackd.example.toml
  } >"$out/rollbackd.toml"
  for want in 'state_dir = "/var/lib/rollbackd"' 'database = "/var/lib/app/app.db"'; do
    [ "$(grep -cxF "$want" "$out/rollbackd.toml")" = 1 ] \
      || { echo "build.sh: the conffile lacks '$want' (config/rollbackd.example.toml changed?)" >&2; exit 1; }
  done
  "$bin" --config "$out/rollbackd.toml" check-config >/dev/null \
    || { echo "build.sh: the packaged configuration does not pass check-config" >&2; exit 1; }
fi

if [ "$package" = 1 ]; then
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "build.sh: cargo-deb is not installed: cargo install cargo-deb --locked" >&2; exit 1
  fi
  echo "== cargo deb --no-build --profile $profile $*"
  cargo deb --no-build --profile "$profile" "$@"
fi
