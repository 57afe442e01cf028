#!/usr/bin/env bash
# Fetch the English package descriptions of several Debian releases into a private apt
# lists folder, without touching the machine's own apt configuration. The embedded model
# (swapmoe_edge/model_data/switch-debian) is trained on the corpus built from it:
#
#   bash scripts/fetch_debian_lists.sh /tmp/apt-multi          # ~65 MB, ~20 s
#   swapmoe data debian --lists-dir /tmp/apt-multi/lists -o /tmp/debcorpus_multi
#
# Releases: bullseye, bookworm, trixie and sid, components main, contrib, non-free (and
# non-free-firmware where it exists). More releases give more distinct descriptions (packages
# added or removed over time, descriptions rewritten); the split stays a hash of the source
# package's name, so a source is on the same side whatever lists are read. sid changes every
# day: a corpus built later is close to, not identical with, the one in the model card.
# Needs apt-get and the Debian archive keyring (any Debian or Ubuntu machine with
# debian-archive-keyring installed). Everything it writes is under DIR; root is not needed
# (run as root and as the user nobody).
set -euo pipefail
DIR=${1:?usage: fetch_debian_lists.sh DIR}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
KEYRING=${KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
if [ ! -f "$KEYRING" ]; then
  echo "error: $KEYRING not found; install it (apt-get install debian-archive-keyring) or set KEYRING" >&2
  exit 1
fi
mkdir -p "$DIR/lists/partial" "$DIR/cache/archives/partial"
{
  for suite in bookworm trixie sid; do
    echo "deb [signed-by=$KEYRING] $MIRROR $suite main contrib non-free non-free-firmware"
  done
  echo "deb [signed-by=$KEYRING] $MIRROR bullseye main contrib non-free"
} > "$DIR/sources.list"
apt-get update -o Acquire::Languages=en \
  -o Dir::Etc::sourcelist="$DIR/sources.list" -o Dir::Etc::sourceparts=/nonexistent \
  -o Dir::State::Lists="$DIR/lists" -o Dir::Cache="$DIR/cache" \
  -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)"
if ! compgen -G "$DIR/lists/*_Translation-en*" > /dev/null; then
  echo "error: apt-get update fetched no *_Translation-en files into $DIR/lists; check the mirror ($MIRROR)" >&2
  exit 1
fi
echo "lists in $DIR/lists; next: swapmoe data debian --lists-dir $DIR/lists -o CORPUS_DIR"
