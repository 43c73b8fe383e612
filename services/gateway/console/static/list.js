// Every stream at a glance: state (with why), output fps, glass-to-glass latency, viewers, drops; polled every 2 s.
// The numbers are the API's (each stream's `stats`: measured once, where they are seen; docs/observability.md).
import {api} from './api.js';
import {el, every, fmt, stateBadge} from './dom.js';

const COLUMNS = ['Stream', 'State', 'Prompt', 'Size', 'FPS', 'Latency', 'Viewers', 'Published', 'Dropped'];

export function listView(root) {
  const body = el('tbody', {id: 'streams'});
  const note = el('p', {class: 'muted'});
  const error = el('p', {class: 'error'});
  root.append(el('div', {class: 'card'},
    el('div', {class: 'row'}, el('h1', {text: 'Streams'}),
      el('a', {href: '#/new', class: 'right', text: '+ New stream'})),
    el('table', {}, el('thead', {}, el('tr', {}, COLUMNS.map((c, i) => el('th', {class: i > 3 ? 'num' : '', text: c})))),
      body), note, error));

  const refresh = async () => {
    let streams;
    try {
      streams = await api('GET', '/v1/streams');
    } catch (e) {
      error.textContent = e.status === 403 ? 'This token reads one stream only: open it by its id (#/s/<id>).'
        : 'Could not read the streams: ' + e.message;
      return;
    }
    error.textContent = '';
    body.replaceChildren(...streams.map(s => {
      const st = s.stats || {};
      return el('tr', {'data-id': s.id},
        el('td', {}, el('a', {href: '#/s/' + s.id, text: s.id})),
        el('td', {}, stateBadge(s.state), el('div', {class: 'reason', text: s.state_reason || ''})),
        el('td', {class: 'prompt', title: s.spec.prompt, text: s.spec.prompt}),
        el('td', {text: `${s.spec.width}×${s.spec.height} @ ${s.spec.fps}${s.spec.t2v ? ' T2V' : ''}`}),
        el('td', {class: 'num fps', text: fmt(st.output_fps, 1)}),
        el('td', {class: 'num latency', text: st.latency_ms == null ? '–' : `${fmt(st.latency_ms / 1000, 2)} s`}),
        el('td', {class: 'num viewers', text: fmt(st.viewers, 0) + (st.viewers_capped ? '+' : '')}),
        el('td', {class: 'num', text: fmt(st.published, 0)}),
        el('td', {class: 'num', title: 'deadline misses: ' + fmt(st.deadline_misses, 0), text: fmt(st.dropped_total, 0)}));
    }));
    note.textContent = streams.length ? `${streams.length} stream(s); updated ${new Date().toLocaleTimeString()}`
      : 'No streams yet: create one.';
  };
  return every(2000, refresh);
}
