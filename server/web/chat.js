// chat.js - the chat page: streams replies from POST /v1/chat/completions.
//
// Like any chat front end it keeps the conversation in the page and sends the whole
// history every turn (the system prompt first, taken from its field at send time),
// so the daemon's prefix cache sees each turn's prompt extend the previous one. The
// reply is read with fetch + ReadableStream and parsed as server-sent events
// (`data:` lines, events ended by a blank line, `[DONE]` last). Stop aborts the
// fetch: the connection closes, the daemon cancels the request and frees its blocks.
// Per reply the page shows completion tokens, cached prompt tokens (from the final
// usage chunk, requested with stream_options.include_usage), time to first token
// and decode speed. Each reply element carries data-state and data-* figures so a
// browser test can read them without scraping the text.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const STORE = { key: 'kvd.apiKey', settings: 'kvd.chatSettings' };

  const els = {
    messages: $('messages'), empty: $('empty-hint'), form: $('composer'), prompt: $('prompt'),
    send: $('send-button'), stop: $('stop-button'), clear: $('clear-button'),
    system: $('system-prompt'), temperature: $('temperature'), temperatureRange: $('temperature-range'),
    maxTokens: $('max-tokens'), apiKey: $('api-key'), modelName: $('model-name'),
    status: $('server-status'), statusText: $('server-status-text'),
  };

  const chat = {
    history: [],      // [{role, content}] without the system prompt
    model: null,      // id from /v1/models, sent with each request
    controller: null, // AbortController of the reply in flight
  };

  // ---- settings ----

  function loadSettings() {
    els.apiKey.value = localStorage.getItem(STORE.key) || '';
    try {
      const s = JSON.parse(localStorage.getItem(STORE.settings) || '{}');
      if (typeof s.system === 'string') els.system.value = s.system;
      if (Number.isFinite(s.temperature)) setTemperature(s.temperature);
      if (Number.isInteger(s.maxTokens) && s.maxTokens > 0) els.maxTokens.value = String(s.maxTokens);
    } catch (e) {
      localStorage.removeItem(STORE.settings); // unreadable: start from the defaults
    }
  }

  function saveSettings() {
    localStorage.setItem(STORE.settings, JSON.stringify({
      system: els.system.value, temperature: Number(els.temperature.value),
      maxTokens: Number(els.maxTokens.value),
    }));
  }

  function setTemperature(value) {
    const t = Math.min(2, Math.max(0, Number(value) || 0));
    els.temperature.value = String(t);
    els.temperatureRange.value = String(t);
  }

  function authHeaders() {
    const key = els.apiKey.value.trim();
    return key ? { Authorization: 'Bearer ' + key } : {};
  }

  // ---- server status and model ----

  async function refreshStatus() {
    try {
      const r = await fetch('/health', { cache: 'no-store' });
      if (r.ok) setStatus('ok', 'ready');
      else if (r.status === 503) {
        const body = await r.json().catch(() => null);
        const code = body && body.error && body.error.code;
        setStatus(code === 'loading' ? 'loading' : 'down', code === 'loading' ? 'loading model' : 'draining');
      } else setStatus('down', 'HTTP ' + r.status);
    } catch (e) {
      setStatus('down', 'unreachable');
    }
    if (!chat.model) await refreshModel();
  }

  function setStatus(state, text) {
    els.status.dataset.state = state;
    els.statusText.textContent = text;
  }

  async function refreshModel() {
    try {
      const r = await fetch('/v1/models', { headers: authHeaders(), cache: 'no-store' });
      if (r.status === 401) { els.modelName.textContent = 'API key needed'; return; }
      if (!r.ok) return;
      const body = await r.json();
      if (body.data && body.data.length) {
        chat.model = body.data[0].id;
        els.modelName.textContent = chat.model;
      }
    } catch (e) { /* the status line already says the server is unreachable */ }
  }

  // ---- messages ----

  function scrolledToBottom() {
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
  }

  function addMessage(role, text) {
    els.empty.hidden = true;
    const msg = document.createElement('div');
    msg.className = 'msg ' + role;
    const who = document.createElement('div');
    who.className = 'who';
    who.textContent = role === 'user' ? 'You' : (chat.model || 'kvd');
    const body = document.createElement('div');
    body.className = 'body';
    body.textContent = text;
    msg.append(who, body);
    els.messages.append(msg);
    els.messages.scrollTop = els.messages.scrollHeight;
    return msg;
  }

  function stat(parent, cls, label) {
    const span = document.createElement('span');
    span.className = cls;
    const b = document.createElement('b');
    span.append(b, document.createTextNode(' ' + label));
    parent.append(span);
    return b;
  }

  // One assistant reply: its element, text and timings.
  function newReply() {
    const msg = addMessage('assistant', '');
    msg.classList.add('streaming');
    msg.dataset.state = 'streaming';
    const stats = document.createElement('div');
    stats.className = 'stats';
    msg.append(stats);
    const reply = {
      msg, body: msg.querySelector('.body'), text: '', pending: '', frame: 0, chunks: 0, usage: null, finish: null,
      sentAt: performance.now(), firstAt: 0, lastAt: 0,
      out: {
        tokens: stat(stats, 'tokens', 'tokens'), cached: stat(stats, 'cached', 'cached prompt tokens'),
        ttft: stat(stats, 'ttft', 'to first token'), tps: stat(stats, 'tps', 'tokens/s'),
      },
      finishEl: document.createElement('span'),
    };
    reply.finishEl.className = 'finish';
    stats.append(reply.finishEl);
    renderStats(reply);
    return reply;
  }

  function renderStats(r) {
    // Until the usage chunk arrives, each content chunk stands for one token (the
    // daemon sends one per engine event; a slow reader may see a few merged).
    const tokens = r.usage ? r.usage.completion_tokens : r.chunks;
    const cached = r.usage && r.usage.prompt_tokens_details ? r.usage.prompt_tokens_details.cached_tokens : null;
    const ttft = r.firstAt ? r.firstAt - r.sentAt : null;
    const decodeMs = r.lastAt - r.firstAt;
    const tps = tokens > 1 && decodeMs > 0 ? (tokens - 1) * 1000 / decodeMs : null;
    r.out.tokens.textContent = String(tokens);
    r.out.cached.textContent = cached === null ? '–' : cached + (r.usage ? ' / ' + r.usage.prompt_tokens : '');
    r.out.ttft.textContent = ttft === null ? '–' : ttft.toFixed(0) + ' ms';
    r.out.tps.textContent = tps === null ? '–' : tps.toFixed(1);
    const d = r.msg.dataset;
    d.tokens = String(tokens);
    d.cachedTokens = cached === null ? '' : String(cached);
    d.promptTokens = r.usage ? String(r.usage.prompt_tokens) : '';
    d.ttftMs = ttft === null ? '' : ttft.toFixed(1);
    d.tokensPerSecond = tps === null ? '' : tps.toFixed(2);
  }

  function finishReply(r, state, note) {
    flush(r);
    r.msg.classList.remove('streaming');
    r.msg.dataset.state = state;
    if (r.finish) r.msg.dataset.finishReason = r.finish;
    r.finishEl.textContent = note || (r.finish ? 'finish: ' + r.finish : '');
    renderStats(r);
  }

  function onChunk(r, obj) {
    if (obj.error) throw new Error(obj.error.message || 'generation failed');
    const choice = obj.choices && obj.choices[0];
    if (choice) {
      const delta = choice.delta || {};
      // The first chunk only announces the role; time to first token counts from
      // the first chunk that carries generated text.
      if (!('role' in delta) && typeof delta.content === 'string') {
        const now = performance.now();
        if (!r.firstAt) r.firstAt = now;
        r.lastAt = now;
        r.chunks++;
        if (delta.content) {
          r.text += delta.content;
          r.pending += delta.content;
        }
      }
      if (choice.finish_reason) r.finish = choice.finish_reason;
    }
    if (obj.usage) r.usage = obj.usage;
    if (!r.frame) r.frame = requestAnimationFrame(() => flush(r));
  }

  // Chunks arrive hundreds of times a second from a small model; the page is
  // updated once per frame with whatever came meanwhile, appended as one text node,
  // so the main thread stays free for input (the Stop button) and layout.
  function flush(r) {
    if (r.frame) cancelAnimationFrame(r.frame);
    r.frame = 0;
    if (r.pending) {
      const follow = scrolledToBottom();
      r.body.append(r.pending);
      r.pending = '';
      if (follow) els.messages.scrollTop = els.messages.scrollHeight;
    }
    renderStats(r);
  }

  // Reads an SSE body; calls onData(payload) per event. Returns at [DONE] or EOF.
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = '';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        let line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (data.length) {
            const payload = data.join('\n');
            data = [];
            if (payload === '[DONE]') { reader.cancel().catch(() => {}); return; }
            onData(payload);
          }
        } else if (line.startsWith('data:')) {
          data.push(line.slice(line[5] === ' ' ? 6 : 5));
        } // comments (":") and other fields are not used by kvd
      }
    }
  }

  async function errorMessage(response) {
    const text = await response.text().catch(() => '');
    try {
      const body = JSON.parse(text);
      if (body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON: show the status line */ }
    return 'HTTP ' + response.status + (text ? ': ' + text.slice(0, 200) : '');
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.disabled = !busy;
  }

  async function send(text) {
    const userTurn = { role: 'user', content: text };
    chat.history.push(userTurn);
    const userMsg = addMessage('user', text);
    const messages = [];
    const system = els.system.value.trim();
    if (system) messages.push({ role: 'system', content: system });
    messages.push(...chat.history);
    const request = {
      messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(els.temperature.value), max_tokens: Math.max(1, Math.floor(Number(els.maxTokens.value) || 1)),
    };
    if (chat.model) request.model = chat.model;

    const reply = newReply();
    const controller = new AbortController();
    chat.controller = controller;
    setBusy(true);
    try {
      const response = await fetch('/v1/chat/completions', {
        method: 'POST', headers: Object.assign({ 'Content-Type': 'application/json' }, authHeaders()),
        body: JSON.stringify(request), signal: controller.signal, cache: 'no-store',
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      await readEvents(response, (payload) => onChunk(reply, JSON.parse(payload)));
      finishReply(reply, 'done');
      chat.history.push({ role: 'assistant', content: reply.text });
    } catch (e) {
      if (controller.signal.aborted) {
        // What was shown stays part of the conversation, as in other chat UIs.
        finishReply(reply, 'stopped', 'stopped');
        chat.history.push({ role: 'assistant', content: reply.text });
      } else {
        reply.msg.classList.add('error');
        if (!reply.text) reply.body.textContent = e.message;
        finishReply(reply, 'error', reply.text ? 'error: ' + e.message : 'not sent');
        if (!reply.text) {
          // Nothing came back: the turn is dropped so the next send does not
          // carry an unanswered message.
          chat.history.splice(chat.history.indexOf(userTurn), 1);
          userMsg.title = 'not sent: ' + e.message;
        }
      }
    } finally {
      chat.controller = null;
      setBusy(false);
    }
  }

  // ---- wiring ----

  els.form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || chat.controller) return;
    els.prompt.value = '';
    send(text);
  });
  els.prompt.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      els.form.requestSubmit();
    }
  });
  els.stop.addEventListener('click', () => { if (chat.controller) chat.controller.abort(); });
  els.clear.addEventListener('click', () => {
    if (chat.controller) chat.controller.abort();
    chat.history = [];
    for (const m of [...els.messages.querySelectorAll('.msg')]) m.remove();
    els.empty.hidden = false;
  });
  els.temperature.addEventListener('change', () => { setTemperature(els.temperature.value); saveSettings(); });
  els.temperatureRange.addEventListener('input', () => { setTemperature(els.temperatureRange.value); saveSettings(); });
  els.maxTokens.addEventListener('change', saveSettings);
  els.system.addEventListener('change', saveSettings);
  els.apiKey.addEventListener('change', () => {
    const key = els.apiKey.value.trim();
    if (key) localStorage.setItem(STORE.key, key);
    else localStorage.removeItem(STORE.key);
    chat.model = null;
    refreshModel();
  });

  loadSettings();
  refreshStatus();
  setInterval(refreshStatus, 5000);
  els.prompt.focus();
})();
