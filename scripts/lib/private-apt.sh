# Sourced by the fetch-* scripts: download .debs from another Debian suite and unpack them into
# a folder of the repo. Nothing is installed system-wide: apt runs against a private sources
# file, lists dir and cache under <repo>/var/apt-<suite>/, and the .debs are only unpacked with
# dpkg-deb -x.

# private_apt_unpack SUITE DEST PACKAGE...: DEST is emptied, then holds the packages' files.
private_apt_unpack() {
    local suite=$1 dest=$2
    shift 2
    local repo apt_dir
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    apt_dir=$repo/var/apt-$suite

    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    cat >"$apt_dir/$suite.sources" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES

    local apt_opts=(
        -q -o "Dir::Etc::sourcelist=$apt_dir/$suite.sources"
        -o Dir::Etc::sourceparts=/nonexistent
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o Debug::NoLocking=1
        -o APT::Sandbox::User=root
    )
    apt-get "${apt_opts[@]}" update >"$apt_dir/update.log" 2>&1 || {
        echo "apt-get update for $suite failed (see $apt_dir/update.log)" >&2
        return 1
    }

    local downloads=$apt_dir/download
    rm -rf "$downloads"
    mkdir -p "$downloads"
    (cd "$downloads" && apt-get "${apt_opts[@]}" download "$@") >"$apt_dir/download.log" 2>&1 || {
        echo "apt-get download $* from $suite failed (see $apt_dir/download.log)" >&2
        return 1
    }

    rm -rf "$dest"
    mkdir -p "$dest"
    local deb
    for deb in "$downloads"/*.deb; do
        dpkg-deb -x "$deb" "$dest"
    done
}
