// MamFusion search page: plain JS, no build step. Talks to the API of flows/serve.py.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"), q: $("q"), k: $("k"), go: $("go"), message: $("message"), results: $("results"),
    status: $("model-status"), player: $("player"), video: $("video"), strip: $("strip"),
    title: $("player-title"), mode: $("player-mode"), note: $("player-note"), close: $("player-close"),
  };
  const SVG = "http://www.w3.org/2000/svg";
  let limits = { k: 100, query_chars: 1000 };

  // ------------------------------------------------------------------------------------------ token
  // A server bound beyond loopback needs a token: the page is opened as /?token=T. It is kept for the tab
  // only (sessionStorage), removed from the address bar, sent as a header to the API and as ?token= on
  // media URLs (a <video> or <img> cannot send headers).
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || sessionStorage.getItem("mamfusion-token") || "";
  if (params.has("token")) {
    sessionStorage.setItem("mamfusion-token", token);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : ""));
  }
  const withToken = (url) =>
    token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;

  // -------------------------------------------------------------------------------------------- API
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function detailText(body) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((e) => (e.loc ? e.loc.slice(1).join(".") + ": " : "") + e.msg).join("; ");
    }
    return "";
  }

  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (e) {
      throw new ApiError(0, "cannot reach the server (" + e.message + ")");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) throw new ApiError(response.status, detailText(body) || response.statusText);
    return body;
  }

  function explain(error) {
    const status = error.status;
    if (status === undefined) return { state: "error", text: String(error) };
    if (status === 0) return { state: "offline", text: error.message };
    if (status === 400) return { state: "bad-query", text: "Query refused: " + error.message };
    if (status === 401) {
      return { state: "token", text: "This server needs a token: open the page as /?token=YOUR_TOKEN." };
    }
    if (status === 503 && /no model/i.test(error.message)) {
      return { state: "no-model", text: "No model is being served yet: " + error.message };
    }
    if (status === 503) return { state: "busy", text: "The server is busy: " + error.message };
    if (status >= 500) return { state: "server-error", text: `Server error (${status}): ${error.message}` };
    return { state: "error", text: `Error ${status}: ${error.message}` };
  }

  function say(state, text, isError = false) {
    els.message.hidden = !text;
    els.message.dataset.state = state;
    els.message.textContent = text || "";
    els.message.classList.toggle("error", isError);
  }

  const fmt = (t) => (Math.round(t * 10) / 10).toFixed(1);

  // ----------------------------------------------------------------------------------------- status
  async function refreshStatus(first) {
    try {
      const s = await api("/api/status");
      limits = s.limits || limits;
      if (s.status === "ok") {
        els.status.dataset.state = "ok";
        els.status.textContent = `model ${s.version} · ${s.videos} videos` + (s.problem ? ` · ${s.problem}` : "");
      } else {
        els.status.dataset.state = "no-model";
        els.status.textContent = "no model loaded";
        if (first) say("no-model", "No model is being served yet: " + (s.problem || "none published"), true);
      }
    } catch (e) {
      els.status.dataset.state = "error";
      els.status.textContent = "server unavailable";
      if (first) {
        const x = explain(e);
        say(x.state, x.text, true);
      }
    }
  }

  // ---------------------------------------------------------------------------------------- results
  const infos = new Map();
  function videoInfo(id) {
    if (!infos.has(id)) {
      const pending = api(`/api/videos/${encodeURIComponent(id)}`);
      pending.catch(() => infos.delete(id));
      infos.set(id, pending);
    }
    return infos.get(id);
  }

  function svgRect(svg, x, y, w, h, cls) {
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", x.toFixed(2));
    r.setAttribute("y", y.toFixed(2));
    r.setAttribute("width", Math.max(0, w).toFixed(2));
    r.setAttribute("height", Math.max(0, h).toFixed(2));
    r.setAttribute("class", cls);
    svg.append(r);
    return r;
  }

  // The clip-score profile as bars over the video's duration (each clip at its own time span when the hit
  // carries them, else evenly spread), and the matched span as a highlighted band.
  function drawTimeline(svg, hit, duration) {
    const profile = Array.isArray(hit.profile) ? hit.profile : [];
    const spans = Array.isArray(hit.clip_spans) && hit.clip_spans.length === profile.length ? hit.clip_spans : null;
    let total = duration || 0;
    if (!total) total = Math.max(hit.end, spans && spans.length ? spans[spans.length - 1][1] : 0) || 1;
    const W = 1000, H = 36;
    const x = (t) => Math.max(0, Math.min(W, (t / total) * W));
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    if (profile.length) {
      const lo = Math.min(...profile), hi = Math.max(...profile), range = hi - lo || 1;
      profile.forEach((p, i) => {
        const [a, b] = spans ? spans[i] : [(i * total) / profile.length, ((i + 1) * total) / profile.length];
        const h = 4 + (28 * (p - lo)) / range;
        const inside = a < hit.end && b > hit.start;
        svgRect(svg, x(a), H - h, Math.max(1, x(b) - x(a) - 0.6), h, inside ? "clip in" : "clip");
      });
    }
    svgRect(svg, x(hit.start), 1, Math.max(2, x(hit.end) - x(hit.start)), H - 2, "span");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `moment ${fmt(hit.start)}–${fmt(hit.end)} s of ${fmt(total)} s`;
    svg.append(title);
    svg.dataset.clips = String(profile.length);
    svg.dataset.duration = String(total);
  }

  function hitItem(hit) {
    const li = document.createElement("li");
    li.className = "hit";
    li.tabIndex = 0;
    li.setAttribute("role", "button");
    Object.assign(li.dataset, { videoId: hit.video_id, start: hit.start, end: hit.end, rank: hit.rank });

    const mid = (hit.start + hit.end) / 2;
    const img = document.createElement("img");
    img.className = "thumb";
    img.loading = "lazy";
    img.alt = `frame at ${fmt(mid)} s of ${hit.video_id}`;
    img.src = withToken(`/api/thumbnail/${encodeURIComponent(hit.video_id)}?t=${mid.toFixed(2)}`);
    img.addEventListener("error", () => img.classList.add("broken"));

    const meta = document.createElement("div");
    meta.className = "meta";
    const line = document.createElement("div");
    line.className = "line";
    for (const [cls, text] of [
      ["rank", `#${hit.rank}`],
      ["vid", hit.video_id],
      ["score", `score ${hit.score.toFixed(4)}`],
      ["moment", `${fmt(hit.start)}–${fmt(hit.end)} s`],
    ]) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      line.append(span);
    }
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "timeline");
    svg.setAttribute("role", "img");
    drawTimeline(svg, hit, null);
    videoInfo(hit.video_id).then((info) => drawTimeline(svg, hit, info.duration), () => {});
    meta.append(line, svg);
    li.append(img, meta);

    li.addEventListener("click", () => play(hit, li));
    li.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        play(hit, li);
      }
    });
    return li;
  }

  let searchSeq = 0;
  els.form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = els.q.value.trim();
    if (!q) {
      say("empty-query", "Type what should happen in the video: the query is empty.", true);
      els.q.focus();
      return;
    }
    if (q.length > limits.query_chars) {
      say("bad-query", `The query has ${q.length} characters; the limit is ${limits.query_chars}.`, true);
      return;
    }
    const seq = ++searchSeq;
    say("loading", "Searching…");
    els.go.disabled = true;
    els.results.setAttribute("aria-busy", "true");
    try {
      const body = await api(`/api/search?q=${encodeURIComponent(q)}&k=${encodeURIComponent(els.k.value)}`);
      if (seq !== searchSeq) return;
      const hits = body.results[0].hits;
      els.results.replaceChildren(...hits.map(hitItem));
      if (hits.length) say("done", `${hits.length} videos · model ${body.version}`);
      else say("no-results", "No video matched.");
    } catch (e) {
      if (seq !== searchSeq) return;
      const x = explain(e);
      say(x.state, x.text, true);
      els.results.replaceChildren();
    } finally {
      if (seq === searchSeq) {
        els.go.disabled = false;
        els.results.removeAttribute("aria-busy");
      }
    }
  });

  // ----------------------------------------------------------------------------------------- player
  // Plays the original file from the span's start and pauses at its end. A file the browser cannot play
  // (the server says so, or the element reports an error) gets the server's H.264 preview of the span; if
  // that fails too, a strip of frames from the span: never a broken player.
  let playing = null;
  let watchHandle = 0;

  function resetPlayer() {
    cancelAnimationFrame(watchHandle);
    const v = els.video;
    v.onerror = v.onloadedmetadata = v.onseeked = v.ontimeupdate = null;
    v.pause();
    v.removeAttribute("src");
    v.load();
    v.hidden = false;
    els.strip.replaceChildren();
    els.strip.hidden = true;
  }

  async function play(hit, li) {
    document.querySelectorAll(".hit.active").forEach((n) => n.classList.remove("active"));
    li.classList.add("active");
    const seq = {};
    playing = seq;
    resetPlayer();
    els.player.hidden = false;
    els.title.textContent = `#${hit.rank} ${hit.video_id}`;
    els.mode.textContent = "";
    els.note.textContent = `moment ${fmt(hit.start)}–${fmt(hit.end)} s`;
    Object.assign(els.video.dataset, { state: "loading", videoId: hit.video_id, mode: "", start: hit.start, end: hit.end });
    els.player.scrollIntoView({ block: "nearest" });
    let info;
    try {
      info = await videoInfo(hit.video_id);
    } catch (e) {
      if (playing !== seq) return;
      els.video.dataset.state = "error";
      els.note.textContent = explain(e).text;
      return;
    }
    if (playing !== seq) return;
    startVideo(hit, info.playable ? "original" : "preview", seq);
  }

  function startVideo(hit, mode, seq) {
    const v = els.video;
    const id = encodeURIComponent(hit.video_id);
    const start = Number(hit.start.toFixed(1)), end = Number(hit.end.toFixed(1));
    const offset = mode === "preview" ? start : 0; // a preview starts at the span's start
    const src = mode === "preview" ? `/media/${id}/preview?start=${start}&end=${end}` : `/media/${id}`;
    Object.assign(v.dataset, { mode, offset: String(offset), state: "loading" });
    els.mode.textContent =
      mode === "preview" ? "· preview of the moment (this file's codec does not play in browsers)" : "· original file";
    const begin = () => {
      v.onseeked = null;
      v.dataset.state = "playing";
      v.play().catch(() => {
        v.dataset.state = "paused";
      });
      watch(hit, offset, seq);
    };
    v.onerror = () => {
      if (playing !== seq) return;
      if (mode === "original") startVideo(hit, "preview", seq);
      else showFrames(hit);
    };
    v.onloadedmetadata = () => {
      if (playing !== seq) return;
      const target = Math.max(0, hit.start - offset);
      if (target > 0.001) {
        v.onseeked = begin;
        v.currentTime = target;
      } else {
        begin();
      }
    };
    v.src = withToken(src);
  }

  function watch(hit, offset, seq) {
    const v = els.video;
    const stopAt = hit.end - offset;
    const check = () => {
      if (playing !== seq || v.dataset.state !== "playing") return false;
      if (v.currentTime >= stopAt - 0.02 || v.ended) {
        v.pause();
        if (v.currentTime > stopAt) v.currentTime = stopAt;
        v.dataset.state = "done";
        return false;
      }
      return true;
    };
    const tick = () => {
      if (check()) watchHandle = requestAnimationFrame(tick);
    };
    v.ontimeupdate = check; // rAF pauses in background tabs; timeupdate still fires
    watchHandle = requestAnimationFrame(tick);
  }

  function showFrames(hit) {
    const v = els.video;
    v.onerror = null;
    v.removeAttribute("src");
    v.load();
    v.hidden = true;
    Object.assign(v.dataset, { mode: "frames", state: "frames" });
    els.mode.textContent = "· frames of the moment (this video cannot be played here)";
    els.strip.hidden = false;
    const n = 6;
    const figures = [];
    for (let i = 0; i < n; i++) {
      const t = hit.start + ((hit.end - hit.start) * (i + 0.5)) / n;
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = `frame at ${fmt(t)} s`;
      img.src = withToken(`/api/thumbnail/${encodeURIComponent(hit.video_id)}?t=${t.toFixed(2)}`);
      const cap = document.createElement("figcaption");
      cap.textContent = `${fmt(t)} s`;
      fig.append(img, cap);
      figures.push(fig);
    }
    els.strip.replaceChildren(...figures);
  }

  els.close.addEventListener("click", () => {
    playing = null;
    resetPlayer();
    els.player.hidden = true;
    document.querySelectorAll(".hit.active").forEach((n) => n.classList.remove("active"));
  });

  refreshStatus(true);
  setInterval(() => refreshStatus(false), 15000);
})();
