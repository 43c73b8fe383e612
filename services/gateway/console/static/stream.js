// One stream: live preview with latency, prompt and parameter changes (steps, noise, seed: and the seq they took effect at),
// live graphs, restream destinations, going live from the browser.
import {api} from './api.js';
import {el, every, field, fmt, stateBadge} from './dom.js';
import {Graph} from './graph.js';
import {HLSJS_MISSING, hlsjsMissing, play} from '/player/play.js';
import {restreamCard} from './restream.js';
import {goLiveCard} from './golive.js';

export function streamView(root, id) {
  const stops = [];
  const goLive = goLiveCard(id);  // camera or screen → WHIP (golive.js)
  const video = el('video', {id: 'v', muted: true, autoplay: true, playsinline: true});
  video.muted = true;
  const latency = el('span', {class: 'overlay', id: 'latency', text: 'latency –'});
  const videoBox = el('div', {class: 'video'}, video, latency);
  const canvases = ['fps', 'latency', 'drops'].map(n => el('canvas', {id: 'graph-' + n}));
  const graphs = {
    fps: new Graph(canvases[0], {label: 'output fps', digits: 1}),
    latency: new Graph(canvases[1], {label: 'latency', unit: ' s', digits: 2, color: '#b45309'}),
    drops: new Graph(canvases[2], {label: 'drops / s', digits: 1, color: '#b91c1c'}),
  };
  const head = el('div', {class: 'row'}, el('h1', {id: 'stream-title', text: id}), el('span', {id: 'stream-state'}));
  const reason = el('p', {class: 'reason', id: 'stream-reason'});
  const facts = el('dl', {class: 'kv', id: 'facts'});
  const playerNote = el('p', {class: 'muted', id: 'player-note'});

  // prompt: cut (a new warm-up segment) or blend over N chunks
  const prompt = el('textarea', {id: 'prompt', maxlength: 2000});
  const mode = el('select', {id: 'mode'}, el('option', {value: 'cut', text: 'cut'}),
                  el('option', {value: 'blend', text: 'blend'}));
  const blend = el('input', {id: 'blend-chunks', type: 'number', value: 4, min: 0, max: 64});
  const steps = el('input', {id: 'steps', type: 'number', min: 1, max: 4});
  const noise = el('input', {id: 'noise', type: 'number', min: 0.01, max: 1, step: 0.01});
  const seed = el('input', {id: 'seed', type: 'number', min: 0, step: 1, title: 'a new noise seed from the next chunk'});
  const changes = el('ul', {class: 'log', id: 'changes'});
  const error = el('p', {class: 'error', id: 'patch-error'});

  const report = (what, r) => {
    const at = r.effective_seq === null ? 'applies when the stream starts' : `took effect at seq ${r.effective_seq}`;
    changes.prepend(el('li', {'data-seq': r.effective_seq === null ? '' : String(r.effective_seq),
                              text: `${new Date().toLocaleTimeString()}  ${what}: ${at}`}));
  };
  const patch = async (body, what) => {
    error.textContent = '';
    try { report(what, await api('PATCH', `/v1/streams/${id}`, body)); }
    catch (e) { error.textContent = `${what} not applied: ${e.message}`; }
  };
  const applyPrompt = ev => {
    ev.preventDefault();
    const body = {prompt: prompt.value.trim(), mode: mode.value, blend_chunks: Number(blend.value)};
    patch(body, `prompt (${mode.value}${mode.value === 'blend' ? ' over ' + body.blend_chunks + ' chunks' : ''})`);
  };
  const applyParams = ev => {
    ev.preventDefault();
    patch({steps: Number(steps.value), noise_scale: Number(noise.value), seed: Number(seed.value)},
          `steps ${steps.value}, noise ${noise.value}, seed ${seed.value}`);
  };

  root.append(el('div', {class: 'stream'},
    el('section', {},
      el('div', {class: 'card'}, head, reason, videoBox, playerNote, el('div', {class: 'graphs'}, canvases))),
    el('section', {},
      el('form', {class: 'card', id: 'prompt-form', onsubmit: applyPrompt}, el('h2', {text: 'Prompt'}),
         field('Prompt', prompt),
         el('div', {class: 'grid'}, field('Change', mode), field('Transition (chunks)', blend)),
         el('button', {id: 'apply-prompt', type: 'submit', text: 'Apply prompt'})),
      el('form', {class: 'card', id: 'params-form', onsubmit: applyParams}, el('h2', {text: 'Parameters (live)'}),
         el('div', {class: 'grid'}, field('Steps', steps), field('Noise scale', noise), field('Seed', seed)),
         el('button', {id: 'apply-params', type: 'submit', text: 'Apply'}), error, changes),
      el('div', {class: 'card'}, el('h2', {text: 'Numbers'}), facts),
      restreamCard(id), goLive.card)));
  stops.push(goLive.stop);

  // the preview: signed URLs minted for this page (same origin: the path only), renewed before they expire
  let player = null;
  const startPlayer = async () => {
    if (player) { player.stop(); player = null; }
    if (hlsjsMissing()) { videoBox.replaceChildren(el('p', {class: 'msg', id: 'hlsjs-missing', text: HLSJS_MISSING})); return; }
    const urls = await api('POST', `/v1/streams/${id}/playback`);
    player = play(video, new URL(urls.llhls_url, location.href).pathname, msg => { playerNote.textContent = msg; });
    video.addEventListener('playing', () => { playerNote.textContent = ''; }, {once: true});
    const renewIn = (urls.playback_expires_at - Date.now() / 1000 - 60) * 1000;
    if (renewIn > 0) { const t = setTimeout(startPlayer, renewIn); stops.push(() => clearTimeout(t)); }
  };
  startPlayer().catch(e => { playerNote.textContent = 'No preview: ' + e.message; });
  stops.push(() => player && player.stop());

  stops.push(every(1000, async () => {
    const l = player ? player.latency() : null;
    latency.textContent = l === null ? 'latency –' : `latency ${l.toFixed(2)} s`;
    graphs.latency.push(l);
  }));

  let first = true, lastDrops = null;
  stops.push(every(2000, async () => {
    const s = await api('GET', `/v1/streams/${id}/stats`);
    if (first) {
      const info = await api('GET', `/v1/streams/${id}`);
      prompt.value = info.spec.prompt;
      steps.value = s.steps; noise.value = s.noise_scale; seed.value = s.seed;
      first = false;
    }
    document.getElementById('stream-state').replaceChildren(stateBadge(s.state));
    reason.textContent = s.state_reason;
    graphs.fps.push(s.output_fps);
    graphs.drops.push(lastDrops === null ? 0 : Math.max(0, s.dropped_total - lastDrops) / 2);
    lastDrops = s.dropped_total;
    const rows = [['target fps', fmt(s.target_fps, 1)], ['output fps', fmt(s.output_fps, 1)],
      ['latency (egress, median)', s.latency_ms === null ? '–' : `${fmt(s.latency_ms / 1000, 2)} s`],
      ['viewers', fmt(s.viewers, 0) + (s.viewers_capped ? '+' : '')], ['deadline misses', fmt(s.deadline_misses, 0)],
      ['last output seq', fmt(s.last_output_seq, 0)], ['chunks in flight', fmt(s.chunks_in_flight, 0)],
      ['published', fmt(s.published, 0)], ['dropped', `${s.dropped_total}` +
        (s.dropped_total ? ' (' + Object.entries(s.dropped).map(([k, v]) => `${k} ${v}`).join(', ') + ')' : '')],
      ['prompt version', String(s.prompt_version)], ['steps / noise / seed', `${s.steps} / ${s.noise_scale} / ${s.seed}`]];
    facts.replaceChildren(...rows.flatMap(([k, v]) => [el('dt', {text: k}), el('dd', {text: v})]));
  }));
  return () => stops.forEach(stop => stop());
}
