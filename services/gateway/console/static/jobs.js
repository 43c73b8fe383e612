// Offline jobs: upload a video (or give a prompt alone), follow its progress (server-sent events), then watch and
// download the MP4. The API needs the token in a header, so events and the result are fetched, not linked.
import {ApiError, api, token} from './api.js';
import {el, every, field, fmt, stateBadge} from './dom.js';

const number = (id, value, attrs = {}) => el('input', {id, name: id, type: 'number', value, ...attrs});
const FINISHED = ['done', 'failed', 'cancelled'];

async function request(method, path, body) {
  const r = await fetch(path, {method, body, headers: {Authorization: 'Bearer ' + token()}});
  if (!r.ok) {
    const data = await r.json().catch(() => null);
    throw new ApiError(r.status, (data && typeof data.detail === 'string') ? data.detail : `HTTP ${r.status}`);
  }
  return r;
}

// Each `job` event of GET /v1/jobs/{id}/events, until the server ends the stream (the job finished) or abort.
async function follow(id, signal, onJob) {
  const r = await fetch(`/v1/jobs/${id}/events`, {headers: {Authorization: 'Bearer ' + token()}, signal});
  if (!r.ok) throw new ApiError(r.status, `events: HTTP ${r.status}`);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split('\n').find(l => l.startsWith('data: '));
      if (block.startsWith('event: job') && data) onJob(JSON.parse(data.slice(6)));
    }
  }
}

export function jobsView(root, openId) {
  const file = el('input', {id: 'job-file', type: 'file', accept: 'video/*'});
  const prompt = el('textarea', {id: 'job-prompt', required: true, maxlength: 2000,
                                 placeholder: 'a watercolor painting of a city at dusk'});
  const inputs = {
    width: number('job-width', 128, {min: 16, step: 16}), height: number('job-height', 128, {min: 16, step: 16}),
    steps: number('job-steps', 2, {min: 1, max: 4}), noise_scale: number('job-noise', 0.8, {min: 0.01, max: 1, step: 0.01}),
    seed: number('job-seed', 0, {min: 0}), seconds: number('job-seconds', 2, {min: 0.1, step: 'any'}),
  };
  const error = el('p', {class: 'error', id: 'job-error'});
  const panel = el('div', {id: 'job'});
  const rows = el('tbody', {id: 'jobs'});
  let stream = null;
  const urls = [];

  const submit = async ev => {
    ev.preventDefault();
    error.textContent = '';
    const form = new FormData();
    form.append('prompt', prompt.value.trim());
    for (const [k, input] of Object.entries(inputs)) form.append(k, input.value);
    if (file.files.length) form.append('file', file.files[0]);
    try {
      const job = await (await request('POST', '/v1/jobs', form)).json();
      show(job);
      refresh();
    } catch (e) {
      error.textContent = 'Not queued: ' + (e instanceof ApiError ? e.message
        : 'the upload was cut off (too large for jobs.max_upload_bytes?)');
    }
  };

  function show(job) {
    if (stream) stream.abort();
    stream = new AbortController();
    const bar = el('progress', {id: 'job-progress', max: 1, value: job.progress});
    const status = el('p', {id: 'job-status'});
    const result = el('div', {id: 'job-result'});
    const cancel = el('button', {id: 'job-cancel', class: 'secondary', type: 'button', text: 'Cancel',
      onclick: () => api('DELETE', `/v1/jobs/${job.id}`).catch(e => { status.textContent = e.message; })});
    const head = el('div', {class: 'row'}, el('h1', {text: `Job ${job.id}`}), stateBadge(job.state));
    panel.replaceChildren(el('div', {class: 'card', 'data-id': job.id}, head, bar, status, cancel, result));
    const update = j => {
      head.replaceChildren(el('h1', {text: `Job ${j.id}`}), stateBadge(j.state));
      bar.value = j.progress;
      const where = j.state === 'queued' ? ` · position ${j.queue_position} in the queue` : '';
      status.textContent = `${fmt(100 * j.progress, 0)} % · chunks ${j.chunks_done}/${j.chunks_total || '?'} · ` +
        `frames ${j.frames_done}/${j.frames_total || '?'}${where}${j.reason ? ' · ' + j.reason : ''}`;
      cancel.hidden = FINISHED.includes(j.state);
      if (j.state === 'done') preview(j, result);
    };
    update(job);
    follow(job.id, stream.signal, update).catch(e => { if (e.name !== 'AbortError') status.textContent = e.message; });
  }

  async function preview(job, into) {
    const blob = await (await request('GET', job.result_url)).blob();
    const url = URL.createObjectURL(blob);
    urls.push(url);
    into.replaceChildren(
      el('div', {class: 'video'}, el('video', {id: 'job-video', src: url, controls: true, loop: true, muted: true,
                                                autoplay: true, playsinline: true})),
      el('p', {}, el('a', {id: 'job-download', href: url, download: `${job.id}.mp4`,
                           text: `Download ${job.id}.mp4 (${fmt(job.result_bytes / 1024, 0)} KiB)`})));
  }

  const refresh = async () => {
    const jobs = await api('GET', '/v1/jobs');
    rows.replaceChildren(...jobs.map(j => el('tr', {'data-id': j.id},
      el('td', {}, el('a', {href: '#/jobs/' + j.id, text: j.id})),
      el('td', {}, stateBadge(j.state), el('div', {class: 'reason',
        text: j.state === 'queued' ? `position ${j.queue_position} in the queue` : j.reason || ''})),
      el('td', {class: 'prompt', title: j.params.prompt, text: j.params.prompt}),
      el('td', {text: j.params.t2v ? `T2V ${j.params.seconds} s` : j.input_name}),
      el('td', {class: 'num', text: fmt(100 * j.progress, 0) + ' %'}))));
  };

  root.append(
    el('form', {class: 'card', id: 'job-form', onsubmit: submit},
      el('h1', {text: 'New offline job'}),
      el('p', {class: 'muted', text: 'Restyle a video file, or leave the file empty to generate from the prompt ' +
                                     'alone (text to video, for the seconds given). The result is an MP4.'}),
      field('Video (optional)', file), field('Prompt', prompt),
      el('div', {class: 'grid'}, field('Width', inputs.width), field('Height', inputs.height),
         field('Steps', inputs.steps), field('Noise scale', inputs.noise_scale), field('Seed', inputs.seed),
         field('Seconds (text to video)', inputs.seconds)),
      error, el('button', {id: 'job-submit', type: 'submit', text: 'Start job'})),
    panel,
    el('div', {class: 'card'}, el('h1', {text: 'Jobs'}), el('table', {},
      el('thead', {}, el('tr', {}, ['Job', 'State', 'Prompt', 'Input', 'Progress'].map(
        (c, i) => el('th', {class: i > 3 ? 'num' : '', text: c})))), rows)));
  if (openId) api('GET', `/v1/jobs/${openId}`).then(show).catch(e => { error.textContent = e.message; });
  const stop = every(3000, refresh);
  return () => {
    stop();
    if (stream) stream.abort();
    urls.forEach(u => URL.revokeObjectURL(u));
  };
}
