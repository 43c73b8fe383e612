// Restream destinations of one stream (GET/PUT /v1/streams/{id}/restream, body {"destinations": [...]}):
// the card hides itself where the gateway has no such API (404).
import {api} from './api.js';
import {el} from './dom.js';

export function restreamCard(id) {
  const list = el('ul', {class: 'restream', id: 'restream-list'});
  const input = el('input', {id: 'restream-url', placeholder: 'rtmp://… or rtmps://…'});
  const error = el('p', {class: 'error'});
  const card = el('div', {class: 'card', id: 'restream', hidden: true}, el('h2', {text: 'Restream destinations'}),
    list, el('form', {class: 'row', onsubmit: ev => { ev.preventDefault(); save([...current, input.value.trim()]); }},
      input, el('button', {type: 'submit', text: 'Add'})), error);
  let current = [];
  const show = destinations => {
    current = destinations;
    list.replaceChildren(...destinations.map((d, i) => el('li', {}, el('span', {text: d}),
      el('button', {class: 'secondary', type: 'button', text: 'Remove',
                    onclick: () => save(current.filter((_, j) => j !== i))}))));
    if (!destinations.length) list.append(el('li', {class: 'muted', text: 'none'}));
  };
  const save = async destinations => {
    error.textContent = '';
    try {
      const r = await api('PUT', `/v1/streams/${id}/restream`, {destinations});
      show(r && r.destinations ? r.destinations : destinations);
      input.value = '';
    } catch (e) { error.textContent = 'Not saved: ' + e.message; }
  };
  api('GET', `/v1/streams/${id}/restream`).then(r => { card.hidden = false; show(r.destinations || []); })
    .catch(() => { card.hidden = true; });  // 404: this gateway has no per-stream restream (yet)
  return card;
}
