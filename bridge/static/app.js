// s2s page: microphone -> bridge (PCM16 16 kHz), transcripts and agent text, reply audio
// (PCM16 24 kHz) played back to back, barge-in, per-turn latency. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The token comes in the address's fragment (#token=…), which browsers never send to a server or
// a proxy; it is kept for this tab only and removed from the address bar (and so from history).
// The bridge refuses ?token= in the websocket URL.
const TOKEN = (() => {
  const h = new URLSearchParams(location.hash.slice(1));
  const tok = h.get("token");
  if (tok) {
    sessionStorage.setItem("s2s-token", tok);
    h.delete("token");
    history.replaceState(null, "", location.pathname + location.search + (h.toString() ? "#" + h : ""));
  }
  return tok || sessionStorage.getItem("s2s-token") || "";
})();

// Exposed for tests and for debugging in the console.
const stats = window.s2sStats = {
  connected: false, ready: false, agent: null,
  audioBytesSent: 0, audioBytesReceived: 0, audioChunksReceived: 0,
  partials: 0, finals: [], replies: [], interrupted: 0, errors: [], latencies: [],
};

let ws = null;
let ctx = null;          // AudioContext (capture and playback)
let micStream = null;
let micNode = null;
let micSource = null;
let talking = false;
let playHead = 0;        // AudioContext time where the next reply chunk starts
let playing = [];        // scheduled AudioBufferSourceNodes (stopped on barge-in)
let outRate = 24000;
let turn = { finalAt: 0, firstAudioAt: 0, li: null, text: "" };

function addError(code, message) {
  stats.errors.push({ code, message });
  const d = document.createElement("div");
  d.textContent = `${message} (${code})`;
  $("errors").appendChild(d);
  while ($("errors").children.length > 3) $("errors").firstChild.remove();
  setTimeout(() => d.remove(), 15000);
}

function setConn(text, ok) {
  $("conn").textContent = text;
  $("conn").className = "badge " + (ok ? "ok" : "bad");
}

function showAgent(agent) {
  if (!agent) return;
  stats.agent = agent;
  $("agent").textContent = `agent: ${agent.kind}`;
  $("agent").className = "badge " + (agent.echo_fallback ? "bad" : "ok");
  if (agent.echo_fallback || agent.notice) {
    $("notice").hidden = false;
    $("notice").textContent = agent.notice ||
      "配置的智能助手没有响应，现在使用内置的回声助手（echo）：它只会复述你说的话。";
  }
}

// The daemon's engines and every fallback it took (its Fallback records, via /healthz).
const COMPONENT_ZH = { "asr.engine": "语音识别", "asr.device": "语音识别设备", "tts.engine": "语音合成",
  "tts.device": "语音合成设备", "tts.voice": "语音合成音色" };
function showEngines(daemon) {
  if (!daemon || !daemon.engines) return;
  const a = daemon.engines.asr, t = daemon.engines.tts;
  $("engines").textContent = `识别 ${a.engine}@${a.device} · 合成 ${t.engine}@${t.device}`;
  const fbs = daemon.fallbacks || [];
  $("engines").className = "badge " + (fbs.length ? "warn" : "ok");
  if (!fbs.length) return;
  const box = $("fallbacks");
  box.hidden = false;
  box.textContent = "";
  const head = document.createElement("div");
  head.textContent = "正在使用备用引擎 / running on fallbacks:";
  box.appendChild(head);
  for (const f of fbs) {
    const li = document.createElement("div");
    li.className = "fallback";
    li.textContent = `${COMPONENT_ZH[f.component] || f.component}: ${f.from} → ${f.to}（${f.reason}）`;
    li.title = `${f.component} ${f.when}`;
    box.appendChild(li);
  }
}

function logLine(cls, text) {
  const li = document.createElement("li");
  li.className = cls;
  li.textContent = text;
  $("log").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

// --- websocket ---------------------------------------------------------------------------

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;  // the token goes in the first message
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  setConn("连接中…", false);
  ws.onopen = () => { stats.connected = true; setConn("已连接", true); };
  ws.onclose = (e) => {
    stats.connected = false;
    stats.ready = false;
    setConn(`已断开 ${e.code}${e.reason ? " " + e.reason : ""}`, false);
    if (e.code !== 1000 && e.code !== 1001) addError(`ws_${e.code}`, `连接已关闭：${e.reason || e.code}`);
    stopMic();
    stopPlayback();
    // Reconnect after a pause unless the server refused us on purpose.
    if (e.code !== 1008) setTimeout(connect, 2000);
  };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") onEvent(JSON.parse(e.data));
    else onAudio(e.data);
  };
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

function onEvent(ev) {
  switch (ev.type) {
    case "hello":
      showAgent(ev.agent);
      break;
    case "ready":
      stats.ready = true;
      outRate = ev.output_sample_rate || 24000;
      showAgent(ev.agent);
      break;
    case "speech_start":
      break;
    case "partial":
      stats.partials++;
      $("partial").textContent = ev.text;
      break;
    case "final": {
      $("partial").textContent = "";
      stats.finals.push(ev.text);
      if (!ev.text) break;
      const li = logLine("user", ev.text);
      turn = { finalAt: performance.now(), firstAudioAt: 0, li: null, text: "" };
      if (ev.latency_ms != null) {
        $("lat-asr").textContent = `${Math.round(ev.latency_ms)} ms`;
        const s = document.createElement("span");
        s.className = "lat";
        s.textContent = `识别 ${Math.round(ev.latency_ms)} ms`;
        li.appendChild(s);
      }
      break;
    }
    case "user_text":
      logLine("user", ev.text);
      turn = { finalAt: performance.now(), firstAudioAt: 0, li: null, text: "" };
      break;
    case "agent_delta":
      if (!turn.li) turn.li = logLine("agent", "");
      turn.text += ev.text;
      turn.li.textContent = turn.text;
      break;
    case "agent_done":
      stats.replies.push(ev.text);
      if (!turn.li) turn.li = logLine("agent", ev.text);
      break;
    case "tts_start":
      outRate = ev.sample_rate || outRate;
      break;
    case "tts_end":
      break;
    case "interrupted":
      stats.interrupted++;
      stopPlayback();
      if (turn.li) turn.li.classList.add("interrupted");
      break;
    case "error":
      addError(ev.code, ev.message);
      break;
    default:
      break;
  }
}

// --- playback: PCM16 chunks scheduled back to back ----------------------------------------

function ensureContext() {
  if (!ctx) ctx = new (window.AudioContext || window.webkitAudioContext)({ latencyHint: "interactive" });
  if (ctx.state === "suspended") ctx.resume();
  return ctx;
}

function onAudio(buf) {
  stats.audioBytesReceived += buf.byteLength;
  stats.audioChunksReceived++;
  $("recv").textContent = `${(stats.audioBytesReceived / 2 / outRate).toFixed(1)} s`;
  if (turn.finalAt && !turn.firstAudioAt) {
    turn.firstAudioAt = performance.now();
    const ms = turn.firstAudioAt - turn.finalAt;
    stats.latencies.push(ms);
    $("lat-tts").textContent = `${Math.round(ms)} ms`;
  }
  const c = ensureContext();
  const pcm = new Int16Array(buf);
  if (pcm.length === 0) return;
  const ab = c.createBuffer(1, pcm.length, outRate);
  const ch = ab.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = c.createBufferSource();
  src.buffer = ab;
  src.connect(c.destination);
  // Start where the previous chunk ends; after an underrun, a little ahead of now.
  const start = Math.max(playHead, c.currentTime + 0.03);
  src.start(start);
  playHead = start + ab.duration;
  playing.push(src);
  src.onended = () => { playing = playing.filter((s) => s !== src); };
}

function stopPlayback() {
  for (const s of playing) { try { s.stop(); } catch (e) { /* already stopped */ } }
  playing = [];
  playHead = 0;
}

// --- microphone ----------------------------------------------------------------------------

async function startMic() {
  if (!window.isSecureContext || !navigator.mediaDevices) {
    // Browsers give the microphone only to https:// pages and to localhost.
    throw new Error(`${location.protocol}//${location.host} is not a secure origin, so the browser gives it no ` +
      "microphone: open the page over https (bridge.tls_cert / bridge.tls_key, or a reverse proxy; see the " +
      "README) or on the machine itself as http://localhost. Typing works here. " +
      "浏览器只允许 https 或 localhost 页面使用麦克风：请用 https 打开本页（配置 bridge.tls_cert / tls_key 或反向代理），" +
      "或在本机用 http://localhost 打开；文字输入仍可使用。");
  }
  const c = ensureContext();
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  await c.audioWorklet.addModule("worklet.js");
  micSource = c.createMediaStreamSource(micStream);
  micNode = new AudioWorkletNode(c, "pcm16-capture", { processorOptions: { outRate: 16000, chunkMs: 40 } });
  micNode.port.onmessage = (e) => {
    if (!ws || ws.readyState !== WebSocket.OPEN || !stats.ready) return;
    const pcm = new Int16Array(e.data);
    let peak = 0;
    for (let i = 0; i < pcm.length; i += 8) peak = Math.max(peak, Math.abs(pcm[i]));
    $("level").firstElementChild.style.width = `${Math.min(100, (peak / 32768) * 200)}%`;
    ws.send(e.data);
    stats.audioBytesSent += e.data.byteLength;
    $("sent").textContent = `${(stats.audioBytesSent / 32000).toFixed(1)} s`;
  };
  micSource.connect(micNode);
  // A silent path to the destination keeps the worklet pulled in every browser.
  const mute = c.createGain();
  mute.gain.value = 0;
  micNode.connect(mute).connect(c.destination);
}

function stopMic() {
  talking = false;
  $("talk").textContent = "开始说话";
  $("talk").classList.remove("on");
  if (micSource) micSource.disconnect();
  if (micNode) { micNode.port.onmessage = null; micNode.disconnect(); }
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  micSource = micNode = micStream = null;
  $("level").firstElementChild.style.width = "0";
}

$("talk").addEventListener("click", async () => {
  if (!talking) {
    talking = true;
    $("talk").textContent = "停止";
    $("talk").classList.add("on");
    const hotwords = $("hotwords").value.split(/[,，\s]+/).filter(Boolean);
    send({ type: "start", language: $("language").value, hotwords, token: TOKEN || undefined });
    try {
      await startMic();
    } catch (e) {
      addError("microphone", `无法使用麦克风：${e.message || e}`);
      send({ type: "stop" });
      stopMic();
    }
  } else {
    send({ type: "stop" });
    stopMic();
    stats.ready = false;
  }
});

$("textform").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("textinput").value.trim();
  if (!text) return;
  ensureContext();
  send({ type: "text", text, token: TOKEN || undefined });
  $("textinput").value = "";
});

// Show the bridge's health (daemon, agent, echo fallback) before anything is said.
fetch("healthz").then((r) => r.json()).then((h) => {
  if (h.agent) showAgent(h.agent);
  if (h.daemon) showEngines(h.daemon);
  if (h.daemon && !h.daemon.reachable) addError("daemon_unavailable", "语音服务不可用");
}).catch(() => {});

connect();
