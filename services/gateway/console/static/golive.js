// Go live from this browser: camera or screen → WHIP (POST /v1/streams/{id}/whip, same origin; docs/whip.md) →
// the same stream an RTMP publisher feeds. The bearer is the stream key: the one created or replaced in this tab is
// remembered (memory only), any other is typed in. "New stream key" replaces a leaked one (POST /v1/streams/{id}/key).
import {api} from './api.js';
import {copyable, el, field} from './dom.js';

const keys = new Map();
export const rememberKey = (id, key) => { if (key) keys.set(id, key); };

// What OBS (or ffmpeg) needs, from an answer that carries the stream key (creation, a new key): shown only then.
export function publishSettings(s) {
  const ffmpeg = `ffmpeg -re -i input.mp4 -c:v libx264 -preset veryfast -tune zerolatency -g ${Math.round(s.spec.fps)} ` +
    `-c:a aac -f flv ${s.publish_url}`;
  return el('div', {},
    el('label', {text: 'Server'}), copyable('obs-server', s.rtmp_url),
    el('label', {text: 'Stream key'}), copyable('obs-key', s.stream_key),
    el('label', {text: 'ffmpeg (one line)'}), el('code', {class: 'cmd', id: 'obs-ffmpeg', text: ffmpeg}));
}

// ICE gathering done (WHIP without trickle: every candidate travels in the offer); host candidates take ms.
function gathered(pc) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise(resolve => {
    const t = setTimeout(resolve, 3000);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
    });
  });
}

async function capture(kind) {
  if (kind === 'screen') return navigator.mediaDevices.getDisplayMedia({video: {frameRate: 30}, audio: false});
  return navigator.mediaDevices.getUserMedia({video: {width: 640, height: 480, frameRate: 30}, audio: true});
}

export function goLiveCard(id) {
  const source = el('select', {id: 'golive-source'}, el('option', {value: 'camera', text: 'Camera'}),
                    el('option', {value: 'screen', text: 'Screen'}));
  const key = el('input', {id: 'golive-key', type: 'password', autocomplete: 'off', placeholder: 'stream key'});
  key.value = keys.get(id) || '';
  const start = el('button', {id: 'golive-start', type: 'button', text: 'Go live'});
  const stop = el('button', {id: 'golive-stop', type: 'button', class: 'secondary', text: 'Stop', disabled: true});
  const status = el('p', {id: 'golive-status', class: 'muted', 'data-state': 'idle',
                          text: 'Publish this browser\'s camera (with its microphone) or screen (without sound) to the stream.'});
  const preview = el('video', {id: 'golive-preview', muted: true, autoplay: true, playsinline: true});
  preview.muted = true;
  let pc = null, media = null, session = null, bearer = '';
  const say = (state, text) => { status.dataset.state = state; status.textContent = text; };
  const end = async text => {
    if (session) {
      const url = session;
      session = null;
      await fetch(url, {method: 'DELETE', headers: {Authorization: 'Bearer ' + bearer}}).catch(() => {});
    }
    if (pc) { pc.close(); pc = null; }
    if (media) { media.getTracks().forEach(t => t.stop()); media = null; }
    preview.srcObject = null;
    start.disabled = false; stop.disabled = true;
    if (text) say('idle', text);
  };
  start.addEventListener('click', async () => {
    bearer = key.value.trim();
    if (!bearer) { say('error', 'The stream key is needed (it was shown when the stream was created).'); return; }
    start.disabled = true;
    say('starting', 'Starting the capture…');
    try {
      media = await capture(source.value);
      preview.srcObject = media;
      pc = new RTCPeerConnection();  // no ICE servers: host candidates (this machine, the LAN)
      for (const t of media.getTracks()) pc.addTransceiver(t, {direction: 'sendonly'});
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
      const r = await fetch(`/v1/streams/${id}/whip`, {method: 'POST', body: pc.localDescription.sdp,
        headers: {'Content-Type': 'application/sdp', Authorization: 'Bearer ' + bearer}});
      if (r.status !== 201) {
        const d = await r.json().catch(() => null);
        throw new Error(d && typeof d.detail === 'string' ? d.detail : `HTTP ${r.status}`);
      }
      session = new URL(r.headers.get('Location'), location.href).pathname;
      const conn = pc;
      conn.addEventListener('connectionstatechange', () => {
        if (conn !== pc) return;
        if (conn.connectionState === 'connected') say('live', `Live from this browser (${source.value}).`);
        if (conn.connectionState === 'failed') end('Stopped: no network path to ingest (ICE failed).');
      });
      await pc.setRemoteDescription({type: 'answer', sdp: await r.text()});
      media.getVideoTracks()[0].addEventListener('ended', () => end('Stopped: the capture ended.'));
      stop.disabled = false;
      if (pc.connectionState !== 'connected') say('connecting', 'Connecting…');
    } catch (e) {
      await end();
      say('error', 'Not live: ' + e.message);
    }
  });
  stop.addEventListener('click', () => end('Stopped.'));
  // a new stream key (operators): the old one stops at once, and whoever publishes with it is disconnected
  const rotate = el('button', {id: 'golive-rotate', type: 'button', class: 'secondary', text: 'New stream key'});
  const rotated = el('div', {id: 'golive-rotated'});
  rotate.addEventListener('click', async () => {
    if (!confirm('Replace the stream key? The current key stops working at once; whoever publishes with it ' +
                 'is disconnected and must use the new one.')) return;
    try {
      const s = await api('POST', `/v1/streams/${id}/key`);
      rememberKey(id, s.stream_key);
      key.value = s.stream_key;
      rotated.replaceChildren(el('p', {}, el('strong', {text: 'The new stream key is shown only now: copy it.'})),
                              publishSettings(s));
    } catch (e) {
      rotated.replaceChildren(el('p', {class: 'error', text: 'No new key: ' + e.message}));
    }
  });
  const card = el('div', {class: 'card', id: 'golive'}, el('h2', {text: 'Go live from this browser'}),
    el('div', {class: 'grid'}, field('Source', source), field('Stream key', key)),
    el('div', {class: 'row'}, start, stop, rotate), status, rotated, el('div', {class: 'video golive'}, preview));
  return {card, stop: () => end()};
}
