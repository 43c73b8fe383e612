// Create a stream, then show once what OBS (or ffmpeg) needs: the server URL and the stream key.
import {api} from './api.js';
import {el, field} from './dom.js';
import {publishSettings, rememberKey} from './golive.js';

const number = (id, value, attrs = {}) => el('input', {id, name: id, type: 'number', value, ...attrs});

export function createView(root) {
  const prompt = el('textarea', {id: 'new-prompt', name: 'prompt', required: true, maxlength: 2000,
                                 placeholder: 'a watercolor painting of a city at dusk'});
  const kind = el('select', {id: 'new-kind'}, el('option', {value: 'v2v', text: 'Video to video (publish a source)'}),
                  el('option', {value: 't2v', text: 'Text to video (no source)'}));
  const inputs = {
    width: number('new-width', 512, {min: 16, step: 16}), height: number('new-height', 512, {min: 16, step: 16}),
    fps: number('new-fps', 16, {min: 1, step: 'any'}), steps: number('new-steps', 2, {min: 1, max: 4}),
    noise_scale: number('new-noise', 0.8, {min: 0.01, max: 1, step: 0.01}), seed: number('new-seed', 0, {min: 0}),
    t2v_frames: number('new-t2v-frames', 1, {min: 1}),
  };
  const error = el('p', {class: 'error', id: 'create-error'});
  const result = el('div', {id: 'obs'});
  const submit = async ev => {
    ev.preventDefault();
    error.textContent = '';
    const body = {prompt: prompt.value.trim(), t2v: kind.value === 't2v'};
    for (const [k, input] of Object.entries(inputs)) body[k] = Number(input.value);
    if (!body.t2v) delete body.t2v_frames;
    try {
      const s = await api('POST', '/v1/streams', body);
      form.hidden = true;
      rememberKey(s.id, s.stream_key);  // the page's "Go live from this browser" publishes with it
      result.replaceChildren(obsSettings(s));
    } catch (e) {
      error.textContent = 'Not created: ' + e.message;
    }
  };
  const form = el('form', {class: 'card', id: 'create', onsubmit: submit},
    el('h1', {text: 'New stream'}),
    field('Prompt', prompt), field('Kind', kind),
    el('div', {class: 'grid'}, field('Width', inputs.width), field('Height', inputs.height), field('FPS', inputs.fps),
       field('Steps', inputs.steps), field('Noise scale', inputs.noise_scale), field('Seed', inputs.seed),
       field('T2V latent frames / chunk', inputs.t2v_frames)),
    error, el('button', {id: 'create-submit', type: 'submit', text: 'Create stream'}));
  root.append(form, result);
  prompt.focus();
  return () => {};
}

function obsSettings(s) {
  const t2v = s.spec.t2v;
  return el('div', {class: 'card', 'data-id': s.id},
    el('h1', {text: `Stream ${s.id} created`}),
    t2v ? el('p', {text: 'Text to video: nothing to publish, it starts by itself.'})
      : el('p', {}, 'Publish to it from OBS (Settings → Stream → Service: Custom) or ffmpeg. ',
            el('strong', {text: 'The stream key is shown only now: copy it.'})),
    t2v ? null : publishSettings(s),
    el('p', {}, el('a', {id: 'open-stream', href: '#/s/' + s.id, text: 'Open the stream page →'})));
}
