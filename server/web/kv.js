// kv.js - the live KV view: polls GET /v1/kv and draws the block pool.
//
// One poll at a time: the next starts a fixed interval after the previous answer,
// so a slow daemon is never flooded. The pool is drawn on a canvas, one cell per
// physical block, because pools run from a few hundred to a few hundred thousand
// blocks; cells shrink to fit (down to one pixel, painted straight into the image
// data) and the canvas is only repainted when the states string changed. Which
// sequence holds which block comes from the block tables in the same document, so
// pointing at a cell names its holders and pointing at a sequence outlines its
// blocks. Counters of blocks are counted by the daemon from the same snapshot as
// the cells, so the numbers always agree with the picture.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const STATE_NAMES = ['free', 'cached', 'in use', 'shared'];
  const CHIP_CLASSES = ['free', 'cached', 'used', 'shared'];
  const MAX_CHIPS = 48;
  const MAX_GRID_HEIGHT = 420;

  const canvas = $('block-grid');
  const ctx = canvas.getContext('2d');
  const view = {
    doc: null,          // last /v1/kv document
    holders: new Map(), // physical block -> [{seq, logical}]
    layout: null,       // {pitch, cell, cols, rows, width}
    drawnStates: null,  // states string on the canvas
    drawnKey: '',       // layout and highlight the canvas was drawn with
    highlight: null,    // sequence whose blocks are outlined
    timer: 0,
    inflight: false,
    updates: 0,
  };

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }
  const colors = ['--state-free', '--state-cached', '--state-used', '--state-shared'].map(cssVar);
  const rgb = colors.map((c) => {
    const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(c);
    return m ? [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)] : [128, 128, 128];
  });

  const fmt = (n) => (Number.isFinite(n) ? n.toLocaleString('en-US') : '–');
  function bytes(n) {
    if (!Number.isFinite(n)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
  }
  function setValue(id, text, raw) {
    const el = $(id);
    el.textContent = text;
    if (raw !== undefined) el.dataset.value = String(raw);
  }
  function setStatus(state, text) {
    $('server-status').dataset.state = state;
    $('server-status-text').textContent = text;
  }

  // ---- layout and drawing ----

  function computeLayout(n) {
    const width = Math.max(200, Math.floor(canvas.parentElement.clientWidth - 28));
    // Largest square pitch (cell plus gap) that fits n cells in width x MAX_GRID_HEIGHT,
    // capped so small pools do not turn into a few huge tiles.
    let pitch = Math.floor(Math.sqrt((width * MAX_GRID_HEIGHT) / Math.max(1, n)));
    pitch = Math.max(1, Math.min(pitch, 18));
    const cell = pitch >= 4 ? pitch - (pitch >= 10 ? 2 : 1) : pitch;
    const cols = Math.max(1, Math.floor(width / pitch));
    const rows = Math.max(1, Math.ceil(n / cols));
    return { pitch, cell, cols, rows, width: cols * pitch, height: rows * pitch };
  }

  function draw(force) {
    const doc = view.doc;
    if (!doc) return;
    const layout = computeLayout(doc.num_blocks);
    const key = [layout.pitch, layout.cols, layout.rows, view.highlight ? view.highlight.key : ''].join('/');
    if (!force && view.drawnStates === doc.states && view.drawnKey === key) return;
    view.layout = layout;
    view.drawnStates = doc.states;
    view.drawnKey = key;
    const dpr = window.devicePixelRatio || 1;
    canvas.style.width = layout.width + 'px';
    canvas.style.height = layout.height + 'px';
    canvas.width = Math.round(layout.width * dpr);
    canvas.height = Math.round(layout.height * dpr);
    const s = doc.states;
    if (layout.pitch <= 3 && dpr === 1) {
      // Tiny cells: one pixel write per covered pixel beats a fillRect per block.
      const img = ctx.createImageData(canvas.width, canvas.height);
      const px = img.data;
      for (let i = 0; i < s.length; i++) {
        const c = rgb[s.charCodeAt(i) - 48] || rgb[0];
        const x0 = (i % layout.cols) * layout.pitch;
        const y0 = Math.floor(i / layout.cols) * layout.pitch;
        for (let dy = 0; dy < layout.cell; dy++) {
          let o = ((y0 + dy) * canvas.width + x0) * 4;
          for (let dx = 0; dx < layout.cell; dx++, o += 4) {
            px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2]; px[o + 3] = 255;
          }
        }
      }
      ctx.putImageData(img, 0, 0);
    } else {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, layout.width, layout.height);
      for (let state = 0; state < 4; state++) {
        ctx.fillStyle = colors[state];
        ctx.beginPath();
        for (let i = 0; i < s.length; i++) {
          if (s.charCodeAt(i) - 48 !== state) continue;
          ctx.rect((i % layout.cols) * layout.pitch, Math.floor(i / layout.cols) * layout.pitch, layout.cell, layout.cell);
        }
        ctx.fill();
      }
    }
    if (view.highlight) {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.strokeStyle = '#111827';
      ctx.lineWidth = Math.max(1, Math.min(2, layout.pitch / 6));
      for (const b of view.highlight.seq.blocks) {
        if (b < 0 || b >= doc.num_blocks) continue;
        ctx.strokeRect((b % layout.cols) * layout.pitch + 0.5, Math.floor(b / layout.cols) * layout.pitch + 0.5,
          Math.max(1, layout.cell - 1), Math.max(1, layout.cell - 1));
      }
    }
    $('grid-caption').textContent = fmt(doc.num_blocks) + ' blocks, ' + layout.cols + ' per row';
  }

  // ---- counters and tables ----

  function seqKey(seq) { return seq.request_id + '/' + seq.choice; }

  function renderCounters(doc) {
    const st = doc.stats;
    setValue('stat-total', fmt(st.blocks_total), st.blocks_total);
    setValue('stat-pool-bytes', bytes(st.pool_bytes) + ' of KV');
    setValue('stat-used', fmt(st.blocks_used), st.blocks_used);
    setValue('stat-usage', (st.usage * 100).toFixed(1) + '% of the pool', st.usage);
    setValue('stat-shared', fmt(st.blocks_shared), st.blocks_shared);
    setValue('stat-cached', fmt(st.blocks_cached), st.blocks_cached);
    setValue('stat-free', fmt(st.blocks_free), st.blocks_free);
    setValue('stat-running', fmt(st.num_running), st.num_running);
    setValue('stat-waiting', fmt(st.num_waiting) + ' waiting', st.num_waiting);
    setValue('stat-prefix-queries', fmt(st.prefix_queries), st.prefix_queries);
    setValue('stat-prefix-hits', fmt(st.prefix_hits), st.prefix_hits);
    setValue('stat-hit-rate', st.prefix_queries ? (100 * st.prefix_hits / st.prefix_queries).toFixed(1) + '%' : '–');
    setValue('stat-hit-tokens', fmt(st.prefix_hit_tokens) + (st.prefix_query_tokens
      ? ' (' + (100 * st.prefix_hit_tokens / st.prefix_query_tokens).toFixed(1) + '%)' : ''), st.prefix_hit_tokens);
    setValue('stat-evictions', fmt(st.evictions), st.evictions);
    setValue('stat-cow', fmt(st.cow_copies), st.cow_copies);
    setValue('stat-block-size', fmt(doc.block_size), doc.block_size);
    setValue('stat-block-bytes', bytes(st.block_bytes), st.block_bytes);
    setValue('stat-dtype', st.dtype || '–');
    setValue('stat-tokens-stored', fmt(st.tokens_stored), st.tokens_stored);
    setValue('stat-wasted', bytes(st.bytes_wasted), st.bytes_wasted);
    setValue('stat-preemptions', fmt(st.num_preemptions), st.num_preemptions);
    $('legend-block-size').textContent = String(doc.block_size);
    const total = Math.max(1, st.blocks_total);
    $('bar-used').style.cssText = 'width:' + (100 * (st.blocks_used - st.blocks_shared) / total) + '%;background:var(--state-used)';
    $('bar-shared').style.cssText = 'width:' + (100 * st.blocks_shared / total) + '%;background:var(--state-shared)';
    $('bar-cached').style.cssText = 'width:' + (100 * st.blocks_cached / total) + '%;background:var(--state-cached)';
    canvas.dataset.used = String(st.blocks_used);
    canvas.dataset.shared = String(st.blocks_shared);
    canvas.dataset.cached = String(st.blocks_cached);
    canvas.dataset.free = String(st.blocks_free);
  }

  function renderSequences(doc) {
    const tbody = $('seq-rows');
    const rows = [];
    for (const seq of doc.sequences) {
      const tr = document.createElement('tr');
      tr.dataset.seq = seqKey(seq);
      const cells = [seq.request_id, seq.choice, fmt(seq.num_tokens), fmt(seq.num_computed), fmt(seq.blocks.length)];
      for (const c of cells) {
        const td = document.createElement('td');
        td.textContent = String(c);
        tr.append(td);
      }
      const td = document.createElement('td');
      const chips = document.createElement('div');
      chips.className = 'chips';
      seq.blocks.slice(0, MAX_CHIPS).forEach((b, logical) => {
        const chip = document.createElement('span');
        const state = doc.states.charCodeAt(b) - 48;
        chip.className = 'chip ' + (CHIP_CLASSES[state] || 'used');
        chip.textContent = String(b);
        chip.title = 'logical block ' + logical + ' (tokens ' + logical * doc.block_size + '–' +
          ((logical + 1) * doc.block_size - 1) + ') → physical block ' + b + ', ' + (STATE_NAMES[state] || '?');
        chips.append(chip);
      });
      if (seq.blocks.length > MAX_CHIPS) {
        const more = document.createElement('span');
        more.className = 'chip more';
        more.textContent = '+' + (seq.blocks.length - MAX_CHIPS) + ' more';
        chips.append(more);
      }
      td.append(chips);
      tr.append(td);
      tr.addEventListener('mouseenter', () => {
        view.highlight = { key: seqKey(seq), seq };
        const last = seq.num_tokens - (seq.blocks.length - 1) * doc.block_size;
        $('block-info').textContent = 'request ' + seq.request_id + ' choice ' + seq.choice + ': ' +
          seq.blocks.length + ' blocks outlined, the last one holding ' + last + ' of ' + doc.block_size + ' tokens';
        draw(false);
      });
      tr.addEventListener('mouseleave', () => { view.highlight = null; draw(false); });
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    $('seq-empty').hidden = doc.sequences.length > 0;
    $('seq-count').textContent = doc.sequences.length ? '(' + doc.sequences.length + ')' : '';
    // A highlighted sequence that finished has nothing left to outline.
    if (view.highlight) {
      const still = doc.sequences.find((s) => seqKey(s) === view.highlight.key);
      view.highlight = still ? { key: view.highlight.key, seq: still } : null;
    }
  }

  function indexHolders(doc) {
    view.holders = new Map();
    for (const seq of doc.sequences) {
      seq.blocks.forEach((b, logical) => {
        if (!view.holders.has(b)) view.holders.set(b, []);
        view.holders.get(b).push({ seq, logical });
      });
    }
  }

  function describeBlock(i) {
    const doc = view.doc;
    const state = doc.states.charCodeAt(i) - 48;
    let text = 'block ' + i + ': ' + (STATE_NAMES[state] || '?');
    const holders = view.holders.get(i) || [];
    if (holders.length) {
      text += ', held by ' + holders.map((h) => 'request ' + h.seq.request_id + ' choice ' + h.seq.choice +
        ' (logical block ' + h.logical + ')').join('; ');
    } else if (state === 2 || state === 3) {
      text += ' (its sequence started or finished between the snapshot and its table)';
    }
    return text;
  }

  canvas.addEventListener('mousemove', (ev) => {
    const l = view.layout;
    if (!l || !view.doc) return;
    const r = canvas.getBoundingClientRect();
    const col = Math.floor((ev.clientX - r.left) / l.pitch);
    const row = Math.floor((ev.clientY - r.top) / l.pitch);
    const i = row * l.cols + col;
    if (col >= 0 && col < l.cols && i >= 0 && i < view.doc.num_blocks) $('block-info').textContent = describeBlock(i);
  });

  // ---- polling ----

  function authHeaders() {
    const key = (localStorage.getItem('kvd.apiKey') || '').trim();
    return key ? { Authorization: 'Bearer ' + key } : {};
  }

  async function poll() {
    const started = performance.now();
    clearTimeout(view.timer);
    view.inflight = true;
    try {
      const r = await fetch('/v1/kv', { headers: authHeaders(), cache: 'no-store' });
      if (r.status === 401) setStatus('down', 'API key needed: set it on the Chat page');
      else if (r.status === 503) setStatus('loading', 'model loading');
      else if (!r.ok) setStatus('down', 'HTTP ' + r.status);
      else {
        const doc = await r.json();
        view.doc = doc;
        view.updates++;
        indexHolders(doc);
        renderCounters(doc);
        renderSequences(doc);
        draw(false);
        document.body.dataset.kvUpdates = String(view.updates);
        setStatus('ok', doc.stats.num_running ? 'serving' : 'idle');
        $('updated').textContent = 'updated ' + new Date().toLocaleTimeString() + ' (' +
          (performance.now() - started).toFixed(0) + ' ms)';
      }
    } catch (e) {
      setStatus('down', 'unreachable');
    }
    view.inflight = false;
    schedule();
  }

  function schedule() {
    clearTimeout(view.timer);
    const interval = Number($('interval').value);
    if (interval > 0) view.timer = setTimeout(poll, interval);
  }

  // A poll in flight schedules the next one with the new interval when it ends.
  $('interval').addEventListener('change', () => { if (!view.inflight) poll(); });
  window.addEventListener('resize', () => draw(true));
  poll();
})();
