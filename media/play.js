// Live LL-HLS playback with hls.js, shared by the gateway's /player page and its console (served at
// /player/play.js; hls.js itself at /player/hls.min.js, media.player.HLSJS_DEFAULT).
export const HLSJS_MISSING = 'hls.js is not installed: run scripts/fetch-hlsjs.sh';  // = media.player.HLSJS_MISSING

export const hlsjsMissing = () => typeof window.Hls === 'undefined';

// Plays src (a signed /hls/… playlist of this origin) in video; onError(text) hears every hls.js error (fatal ones
// prefixed FATAL). A fatal network error is retried every second: the playlist may not exist before the first
// segment, or its egress is restarting (docs/supervision.md). latency(): seconds from capture to now of the frame
// playing (PROGRAM-DATE-TIME is the capture time), null before the first frame.
// The live-sync target is the playlist's PART-HOLD-BACK (3 part durations); a player behind it catches up at up to
// 1.5x speed (hls.js' default 1 never does), and a stall raises the target by 0.1 s rather than hls.js' 1 s, which
// left it 1.2-1.4 s behind the edge for good after one stall on a loaded machine (docs/latency.md).
export const HLSJS_CONFIG = {lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.5, liveSyncOnStallIncrease: 0.1};

// hls.js starts at an independent part (a segment start: the GOP is one segment) and speeds up only while more than
// 1 s is buffered ahead, so a player that started up to a GOP behind its target stays there (1.0 s behind the edge
// at 8 fps on the tiny stack, against a 0.375 s target: docs/latency.md). Behind the target by more than
// CATCH_UP_S for CATCH_UP_AFTER_MS, it jumps forward inside what is already buffered (no request, no stall).
export const CATCH_UP_S = 0.25;
const CATCH_UP_AFTER_MS = 2000;
const CATCH_UP_MARGIN_S = 0.1;  // left between the new playhead and the end of the buffer

function catchUp(hls, video, onJump) {
  let behindSince = null;
  return setInterval(() => {
    const latency = hls.latency, target = hls.targetLatency, b = video.buffered;
    if (!latency || !target || video.paused || video.seeking || !b.length || latency - target <= CATCH_UP_S) {
      behindSince = null;
      return;
    }
    behindSince = behindSince ?? Date.now();
    if (Date.now() - behindSince < CATCH_UP_AFTER_MS) return;
    behindSince = null;
    const to = Math.min(video.currentTime + latency - target, b.end(b.length - 1) - CATCH_UP_MARGIN_S);
    if (to > video.currentTime + CATCH_UP_S / 2) {
      video.currentTime = to;
      onJump(to);
    }
  }, 250);
}

export function play(video, src, onError = () => {}) {
  const Hls = window.Hls;
  const hls = new Hls(HLSJS_CONFIG);
  let parsed = false, stopped = false;
  hls.on(Hls.Events.ERROR, (_e, d) => {
    if (d.fatal && d.type === Hls.ErrorTypes.NETWORK_ERROR) {
      onError((parsed ? 'retrying ' : 'waiting for the stream: ') + d.details);
      setTimeout(() => { if (!stopped) { if (parsed) hls.startLoad(); else hls.loadSource(src); } }, 1000);
      return;
    }
    onError((d.fatal ? 'FATAL ' : '') + d.type + ' ' + d.details);
  });
  hls.on(Hls.Events.MANIFEST_PARSED, () => {
    parsed = true;
    video.play().catch(err => onError('play: ' + err));
  });
  hls.loadSource(src);
  hls.attachMedia(video);
  const player = {
    hls,
    jumps: 0,  // catch-up jumps so far
    latency: () => (hls.playingDate ? (Date.now() - hls.playingDate.getTime()) / 1000 : null),
    stop: () => { stopped = true; clearInterval(timer); hls.destroy(); },
  };
  const timer = catchUp(hls, video, () => { player.jumps += 1; });
  return player;
}
