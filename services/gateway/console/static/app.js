// The console's shell: sign-in, the hash router (#/streams, #/new, #/s/<id>, #/jobs[/<id>]) and the hls.js banner.
import {api, ApiError, setToken, token} from './api.js';
import {el, field} from './dom.js';
import {HLSJS_MISSING, hlsjsMissing} from '/player/play.js';
import {listView} from './list.js';
import {createView} from './create.js';
import {streamView} from './stream.js';
import {jobsView} from './jobs.js';

const view = document.getElementById('view');
let cleanup = () => {};

function signinView(root) {
  const input = el('input', {id: 'token', type: 'password', autocomplete: 'off', placeholder: 'API token'});
  const error = el('p', {class: 'error', id: 'signin-error'});
  const submit = async ev => {
    ev.preventDefault();
    error.textContent = '';
    const t = input.value.trim();
    try {
      await api('GET', '/v1/streams', undefined, t);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 403)) {  // 403: a per-stream token, valid for its stream only
        error.textContent = e.status === 401 ? 'This token is not valid here.' : e.message;
        return;
      }
    }
    setToken(t);
    location.hash = '#/streams';
  };
  root.append(el('form', {class: 'card signin', onsubmit: submit},
    el('h1', {text: 'Sign in'}),
    el('p', {class: 'muted', text: 'With an API token of this gateway (rheo up prints one). It stays in this tab only.'}),
    field('API token', input), error, el('button', {id: 'signin', type: 'submit', text: 'Sign in'})));
  input.focus();
  return () => {};
}

function route() {
  cleanup();
  view.textContent = '';
  const signedIn = Boolean(token());
  document.getElementById('nav').hidden = !signedIn;
  const hash = location.hash || '#/streams';
  if (!signedIn) { cleanup = signinView(view); return; }
  const m = hash.match(/^#\/s\/([A-Za-z0-9_-]{1,64})$/);
  const job = hash.match(/^#\/jobs(?:\/([A-Za-z0-9_-]{1,64}))?$/);
  if (m) cleanup = streamView(view, m[1]);
  else if (job) cleanup = jobsView(view, job[1]);
  else if (hash === '#/new') cleanup = createView(view);
  else if (hash === '#/signin') { location.hash = '#/streams'; cleanup = () => {}; }
  else cleanup = listView(view);
}

if (hlsjsMissing()) {
  const banner = document.getElementById('banner');
  banner.textContent = HLSJS_MISSING + ' (the previews stay empty until then).';
  banner.hidden = false;
}
document.getElementById('signout').addEventListener('click', () => {
  setToken(null);
  if (location.hash === '#/signin') route(); else location.hash = '#/signin';
});
window.addEventListener('hashchange', route);
route();
