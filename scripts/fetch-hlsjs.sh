#!/bin/sh
# Install hls.js (npm) into .cache/hlsjs for the console, the /player page and the browser tests (media.player.HLSJS_DEFAULT);
# idempotent, never fails the build (the Dockerfile checks the file itself).
set -u
VERSION="${HLSJS_VERSION:-1.7.4}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/hlsjs"
TARGET="$DEST/node_modules/hls.js/dist/hls.min.js"
if [ -f "$TARGET" ] && grep -q "\"version\": \"$VERSION\"" "$DEST/node_modules/hls.js/package.json" 2>/dev/null; then
    echo "hls.js $VERSION already in $DEST"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "npm not found: hls.js not installed: the console and /player show no video (run this again with npm), the browser tests skip"
    exit 0
fi
mkdir -p "$DEST"
# Keep the download out of git even before the root .gitignore lists .cache/.
[ -f "$ROOT/.cache/.gitignore" ] || printf '*\n' > "$ROOT/.cache/.gitignore"
if npm install --prefix "$DEST" "hls.js@$VERSION" --no-audit --no-fund --no-save --silent; then
    echo "hls.js $VERSION installed in $DEST"
else
    echo "npm install hls.js@$VERSION failed: the console and /player show no video, the browser tests skip"
fi
exit 0
