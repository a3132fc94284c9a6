// s2s page: microphone -> bridge (PCM16 16 kHz), transcripts and agent text, reply audio
// (PCM16 24 kHz) played back to back, barge-in, per-turn latency. No build step.
//
// The page says what it is doing: which engines run and every fallback (/healthz), a turn
// state driven by the protocol's events, errors in the page's language merged into one
// status line (a turn's error stays on its bubble), and controls that follow what the
// engines can do. UI language: Chinese, or English with ?ui=en.
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
const UI = params.get("ui") === "en" ? "en" : "zh";

// Exposed for tests and for debugging in the console.
const stats = window.s2sStats = {
  connected: false, ready: false, agent: null, ui: UI,
  audioBytesSent: 0, audioBytesReceived: 0, audioChunksReceived: 0,
  partials: 0, finals: [], replies: [], interrupted: 0, errors: [], latencies: [], textLatencies: [],
  speechEndLatencies: [], speculation: null,
  states: [], starts: [], reconnects: 0, health: undefined,
};

// --- strings -----------------------------------------------------------------------------

const STR = {
  zh: {
    title: "s2s 语音助手", level: "麦克风音量", textLabel: "输入文字", textPlaceholder: "也可以直接输入文字…",
    send: "发送", settings: "设置", language: "识别语言", hotwords: "热词", hotwordsPlaceholder: "用逗号分隔",
    details: "详情", dismiss: "关闭", conversation: "对话", stats: "延迟与音频", stopPlay: "停止播放",
    latAsr: "说完 → 识别结果", latTts: "识别结果 → 首个语音", latText: "发送文字 → 首个语音",
    sent: "上行音频", recv: "收到语音", reconnectNow: "立即重连",
    talkStart: "开始说话", talkStop: "结束说话",
    you: "你", assistant: "助手", listeningPh: "正在听…",
    "state.idle": "空闲", "state.offline": "未连接", "state.starting": "准备中…", "state.listening": "聆听中",
    "state.speaking": "说话中", "state.recognising": "识别中…", "state.thinking": "思考中", "state.playing": "播放中",
    connConnecting: "连接中…", connOpen: "已连接", connClosed: "已断开", connDormant: "空闲断开 · 操作时自动重连",
    reconnectIn: "已断开 · {s} 秒后重连（第 {n} 次）", reconnecting: "正在重连（第 {n} 次）…",
    refused: "服务拒绝了连接", hintOffline: "未连接到语音服务，暂时不能说话或发送文字。",
    hintRefused: "服务拒绝了连接：{why}。修正后请刷新页面。", hintFinalizing: "正在识别上一句，稍候再开始…",
    latE2E: "说完 → 首个语音", seconds: "{s} s", specMark: "推测", specLabel: "推测回复",
    specValue: "用上 {r} · 作废 {c}", specPerTurn: "（每轮作废 {p}）",
    latAsrLabel: "识别 {ms} ms", latFirstAudio: "首个语音 {ms} ms", latTypedLabel: "文字 → 首个语音 {ms} ms",
    notSpoken: "未朗读", partSpoken: "部分未朗读", interrupted: "已打断", playbackStopped: "已停止播放",
    whyNoChinese: "当前合成语音不会说中文", whyTtsFailed: "语音合成失败", whyTtsDown: "语音合成服务不可用",
    agentFailed: "助手出错：{msg}",
    hotwordsUnsupported: "当前识别引擎（{engine}）不支持热词。",
    langMismatchZh: "听起来是中文，但识别语言设为 {lang}。", langMismatchEn: "听起来不是中文，但识别语言设为中文。",
    langNotOffered: "识别引擎不支持：{langs}。",
    ttsNoChinese: "合成语音不会说中文：中文回复只显示文字。",
    bannerFallbacks: "正在使用后备（{n} 项）", bannerEcho: "智能助手：回声模式",
    engines: "识别 {asr} · 合成 {tts}", fallbackTag: "后备", was: "原为 {from}",
    asrLabel: "识别", ttsLabel: "合成", agentLabel: "助手", asrDeviceLabel: "识别设备", ttsDeviceLabel: "合成设备",
    ttsVoiceLabel: "合成音色",
    "mean.asr.engine": "识别可能更慢、不够准确", "mean.asr.engine.nohot": "识别可能更慢、不够准确，不支持热词",
    "mean.asr.device": "识别会更慢", "mean.tts.engine": "回复的声音不同",
    "mean.tts.engine.nozh": "回复的声音不同，中文回复无法朗读", "mean.tts.device": "回复的语音会来得慢一些",
    "mean.tts.voice": "回复使用另一种声音",
    echoNotice: "配置的智能助手（{kind}）没有响应，现在使用内置的回声助手：它只会复述你说的话。",
    agentNotice: "智能助手提示",
    count: "（×{n}）",
    "err.busy": "识别跟不上，部分语音被丢弃", "err.unavailable": "语音服务暂时不可用", "err.timeout": "语音服务响应超时",
    "err.shutting_down": "语音服务正在停止", "err.bad_text": "这段文字无法朗读", "err.unsupported": "当前引擎不支持这个设置",
    "err.unauthorized": "需要正确的访问令牌（网址加 #token=…）", "err.not_started": "请先点“开始说话”",
    "err.bad_message": "页面发送的消息有误", "err.bad_request": "请求有误", "err.unknown_type": "页面发送的消息有误",
    "err.bad_audio": "麦克风音频格式有误", "err.asr_closed": "识别会话意外结束", "err.engine_error": "识别或合成出错",
    "err.internal": "服务内部错误", "err.agent_error": "助手出错", "err.bad_reply": "助手的回答无法读取",
    "err.microphone": "无法使用麦克风", "err.no_session": "识别会话已结束", "err.cancelled": "请求已取消",
    "err.daemon_unavailable": "语音服务不可用", "err.ws_1008": "服务拒绝了连接", "err.ws_1009": "消息太大，连接被关闭",
    "err.ws_1011": "服务内部错误，连接已关闭", "err.ws_1013": "连接数已满，稍后自动重试", "err.other": "出错了",
    "err.agent.timeout": "助手没有按时回答", "err.agent.unavailable": "助手无法连接",
    "err.rate_limited": "说得太快了，这句没有回答；请稍等再试", "err.empty_reply": "助手没有回答", "err.reply_too_long": "回复太长，后面的部分已省略",
    "err.mic_denied": "麦克风权限被拒绝。要重新允许：点地址栏左侧的网站信息图标（ⓘ 或锁形）→“麦克风”选“允许”，然后刷新页面。文字输入仍可使用。",
    "err.mic_missing": "没有找到麦克风。接好麦克风后再点“开始说话”；文字输入仍可使用。",
    "err.mic_busy": "麦克风打不开（可能被其他程序占用）。关掉占用它的程序后再试；文字输入仍可使用。",
    "err.mic_insecure": "麦克风只能在 https 页面或本机 localhost 上使用；文字输入仍可使用。",
    specExplain: "（在你说完之前就开始准备的回复：“用上”是直接播放了，“作废”是你又接着说、只好丢弃）",
    specLast: "上一轮回复是提前准备的",
    hintInsecure: "麦克风只能在 https 页面或本机（localhost）上使用，本页是 {origin}。要从其他设备说话：设置 bridge.tls_cert 和 bridge.tls_key（或用反向代理提供 https），再用 https:// 打开。文字输入仍可使用。",
    hintOrigin: "服务拒绝了连接：本页地址不在允许的来源中（见上方说明）。",
    accessWhy: "无法连接语音服务：本页地址 {origin} 不在服务允许的来源中（HTTP 403），所以一直连不上。",
    accessFix: "怎么办：在服务的配置文件（s2s.yaml）里设置 bridge.allowed_origins: [\"{origin}\"]，重启 s2s-bridge 后刷新本页；或在运行服务的电脑上用 http://localhost:{port}/ 打开。",
    accessMic: "另外，浏览器只在 https 页面（或本机 localhost）上允许使用麦克风：从其他设备访问请设置 bridge.tls_cert 和 bridge.tls_key（或用反向代理提供 https），用 https://{host}/ 打开，并把 \"https://{host}\" 写进 bridge.allowed_origins。",
  },
  en: {
    title: "s2s voice assistant", level: "Microphone level", textLabel: "Type a message", textPlaceholder: "Or type here…",
    send: "Send", settings: "Settings", language: "Speech language", hotwords: "Hotwords",
    hotwordsPlaceholder: "comma separated", details: "Details", dismiss: "Dismiss", conversation: "Conversation",
    stats: "Latency and audio", stopPlay: "Stop playback", latAsr: "end of speech → transcript",
    latTts: "transcript → first audio", latText: "typed text → first audio", sent: "Audio sent",
    recv: "Speech received", reconnectNow: "Reconnect now", talkStart: "Start talking", talkStop: "Stop talking",
    you: "You", assistant: "Assistant", listeningPh: "Listening…",
    "state.idle": "Idle", "state.offline": "Offline", "state.starting": "Starting…", "state.listening": "Listening",
    "state.speaking": "You're speaking", "state.recognising": "Recognising…", "state.thinking": "Thinking",
    "state.playing": "Playing",
    connConnecting: "Connecting…", connOpen: "Connected", connClosed: "Disconnected",
    connDormant: "Closed while idle · reconnects when used",
    reconnectIn: "Disconnected · retrying in {s} s (attempt {n})", reconnecting: "Reconnecting (attempt {n})…",
    refused: "The server refused the connection", hintOffline: "Not connected to the speech service: talking and typing are off.",
    hintRefused: "The server refused the connection: {why}. Fix it and reload the page.",
    hintFinalizing: "Still recognising the last sentence…",
    latE2E: "end of speech → first audio", seconds: "{s} s", specMark: "speculative",
    specLabel: "Speculative replies", specValue: "{r} released / {c} wasted", specPerTurn: " ({p} wasted per turn)",
    latAsrLabel: "recognised in {ms} ms", latFirstAudio: "first audio {ms} ms", latTypedLabel: "text → first audio {ms} ms",
    notSpoken: "Not spoken", partSpoken: "Only partly spoken", interrupted: "Interrupted", playbackStopped: "Playback stopped",
    whyNoChinese: "the voice cannot speak Chinese", whyTtsFailed: "speech synthesis failed",
    whyTtsDown: "speech synthesis is unavailable", agentFailed: "Assistant error: {msg}",
    hotwordsUnsupported: "The recognition engine ({engine}) cannot use hotwords.",
    langMismatchZh: "That sounded like Chinese, but the language is set to {lang}.",
    langMismatchEn: "That did not sound like Chinese, but the language is set to Chinese.",
    langNotOffered: "Not offered by the engine: {langs}.",
    ttsNoChinese: "The voice cannot speak Chinese: Chinese replies are shown as text only.",
    bannerFallbacks: "Running on fallbacks ({n})", bannerEcho: "Assistant: echo mode",
    engines: "ASR {asr} · TTS {tts}", fallbackTag: "fallback", was: "instead of {from}",
    asrLabel: "Recognition", ttsLabel: "Synthesis", agentLabel: "Assistant", asrDeviceLabel: "Recognition device",
    ttsDeviceLabel: "Synthesis device", ttsVoiceLabel: "Voice",
    "mean.asr.engine": "recognition may be slower and less accurate",
    "mean.asr.engine.nohot": "recognition may be slower and less accurate; no hotwords",
    "mean.asr.device": "recognition is slower", "mean.tts.engine": "replies use a different voice",
    "mean.tts.engine.nozh": "a different voice that cannot speak Chinese replies",
    "mean.tts.device": "spoken replies start later", "mean.tts.voice": "replies use another voice",
    echoNotice: "The configured assistant ({kind}) is not answering; the built-in echo assistant only repeats what you say.",
    agentNotice: "Assistant notice", count: " (×{n})",
    "err.busy": "Recognition is falling behind; some audio was dropped", "err.unavailable": "The speech service is unavailable",
    "err.timeout": "The speech service timed out", "err.shutting_down": "The speech service is stopping",
    "err.bad_text": "This text cannot be spoken", "err.unsupported": "The engine does not support this setting",
    "err.unauthorized": "A valid access token is needed (#token=… in the address)",
    "err.not_started": "Press “Start talking” first", "err.bad_message": "The page sent a bad message",
    "err.bad_request": "Bad request", "err.unknown_type": "The page sent a bad message",
    "err.bad_audio": "Bad microphone audio", "err.asr_closed": "The recognition session ended unexpectedly",
    "err.engine_error": "Recognition or synthesis failed", "err.internal": "Internal server error",
    "err.agent_error": "The assistant failed", "err.bad_reply": "The assistant's answer could not be read",
    "err.microphone": "The microphone cannot be used", "err.no_session": "The recognition session has ended",
    "err.cancelled": "Cancelled", "err.daemon_unavailable": "The speech service is unavailable",
    "err.ws_1008": "The server refused the connection", "err.ws_1009": "A message was too big; the connection closed",
    "err.ws_1011": "Internal server error; the connection closed",
    "err.ws_1013": "Too many connections; retrying", "err.other": "Something went wrong",
    "err.agent.timeout": "The assistant did not answer in time", "err.agent.unavailable": "The assistant cannot be reached",
    "err.rate_limited": "Too many turns: this one got no answer; wait a moment",
    "err.empty_reply": "The assistant gave no answer", "err.reply_too_long": "The reply was too long and was cut",
    "err.mic_denied": "Microphone access was denied. To allow it again: click the site icon left of the address (ⓘ or the padlock) → Microphone → Allow, then reload the page. Typing still works.",
    "err.mic_missing": "No microphone was found. Connect one and press “Start talking” again; typing still works.",
    "err.mic_busy": "The microphone cannot be opened (another program may be using it). Close that program and try again; typing still works.",
    "err.mic_insecure": "The microphone works only on https pages or on localhost; typing still works.",
    specExplain: "(replies prepared before you finished speaking: “released” were played as they were, “wasted” were dropped because you went on)",
    specLast: "the last reply was prepared early",
    hintInsecure: "The browser gives the microphone only to https pages or localhost; this page is {origin}. To talk from another device set bridge.tls_cert and bridge.tls_key (or use a reverse proxy with https) and open it with https://. Typing still works.",
    hintOrigin: "The server refused the connection: this page's address is not an allowed origin (see above).",
    accessWhy: "Cannot connect to the speech service: this page's address {origin} is not an allowed origin (HTTP 403), so every retry fails.",
    accessFix: "What to do: set bridge.allowed_origins: [\"{origin}\"] in the service's config (s2s.yaml), restart s2s-bridge and reload this page; or open http://localhost:{port}/ on the machine that runs it.",
    accessMic: "Also, browsers allow the microphone only on https pages (or localhost): for other devices set bridge.tls_cert and bridge.tls_key (or use a reverse proxy with https), open https://{host}/ and put \"https://{host}\" in bridge.allowed_origins.",
  },
};
const LANG_NAME = { zh: "中文", en: "English", auto: UI === "zh" ? "自动" : "Auto" };
const ENGINE_NAME = { whisper: "Whisper", funasr: "FunASR", melo: "MeloTTS", piper: "Piper", kokoro: "Kokoro",
  "kokoro+piper": UI === "zh" ? "Kokoro（中文）+ Piper（英文）" : "Kokoro (Chinese) + Piper (English)", echo: "echo" };

function t(key, vars) {
  let s = STR[UI][key];
  if (s === undefined) s = STR.zh[key] !== undefined ? STR.zh[key] : key;
  for (const [k, v] of Object.entries(vars || {})) s = s.split(`{${k}}`).join(String(v));
  return s;
}
const engineName = (e) => ENGINE_NAME[e] || e;
const deviceName = (d) => (d === "cpu" ? "CPU" : String(d).startsWith("cuda") ? `GPU (${d})` : d);
const CJK = /[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]/;
const CJK_ALL = new RegExp(CJK.source, "g");

function applyStrings() {
  document.documentElement.lang = UI === "zh" ? "zh-CN" : "en";
  document.title = t("title");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", t(el.dataset.i18nLabel));
  $("language").querySelector('option[value="auto"]').textContent = LANG_NAME.auto;
}

// --- page state ----------------------------------------------------------------------------

let ws = null;
let ctx = null;          // AudioContext (capture and playback)
let micStream = null, micNode = null, micSource = null;
let conn = "connecting"; // connecting | open | closed | refused | dormant (closed while unused)
let onOpen = null;       // what the user asked for while dormant: runs once connected
let refusedWhy = "";
let refusedOrigin = null; // {origin, …} from /origin-check: the bridge refuses this page's address
let lastLoudSent = -Infinity;    // when the page last sent a frame with speech-level sound (performance.now())
let attempts = 0;        // reconnect attempts since the last open
let retryAt = 0, retryTimer = null, countdownTimer = null;
let talking = false;     // the microphone is on and a session was asked for
let sessionReady = false;
let finalizing = false;  // `stop` sent; waiting for its final (reason finalize)
let finalizeTimer = null;
let hotwordProbe = null; // hotwords held back until `ready` says the engine can use them
let startHotwords = [];  // what the last `start` carried
let playHead = 0;        // AudioContext time where the next reply chunk starts
let playing = [];        // scheduled AudioBufferSourceNodes
let outRate = 24000;
// Page turns are made at each final/user_text; the bridge numbers the turns it starts. The
// first event with a new number belongs to the oldest turn still without one (a turn the
// bridge refused, rate_limited, never gets a number).
const waiting = [];      // page turns the bridge has not numbered yet, oldest first
const turns = new Map(); // the bridge's turn number -> Turn
let speaking = null;     // {turn, sentence, text, samples}: the sentence whose audio is arriving
let mutedTurn = 0;       // audio of this turn is dropped (the user pressed stop)
let utter = null;        // {li, quiet, lastLoud}: the utterance being spoken
const typedAt = [];      // submit times of typed turns not yet echoed as user_text
const caps = { asrEngine: null, ttsEngine: null, asrHotwords: null, asrLanguages: null, ttsLanguages: null,
  ttsNoChinese: false };
let lastState = "";

// --- turn state ----------------------------------------------------------------------------

function replyPending() {
  for (const tn of allTurns()) if (!turnFinished(tn)) return true;
  return false;
}

function allTurns() { return [...turns.values(), ...waiting]; }

function turnFor(no) {
  if (no == null) return null;
  let turn = turns.get(no);
  if (!turn && waiting.length) {
    turn = waiting.shift();
    turn.no = no;
    turns.set(no, turn);
    for (const k of turns.keys()) if (k < no - 20) turns.delete(k);  // keep the map small
  }
  return turn || null;
}

function computeState() {
  if (conn === "dormant") return "idle";
  if (conn !== "open") return "offline";
  if (playing.length) return "playing";
  if (utter) return utter.quiet ? "recognising" : "speaking";
  if (finalizing) return "recognising";
  if (replyPending()) return "thinking";
  if (talking) return sessionReady ? "listening" : "starting";
  return "idle";
}

function refreshState() {
  const s = computeState();
  if (s !== lastState) {
    lastState = s;
    stats.states.push(s);
    const el = $("turnstate");
    el.dataset.state = s;
    el.className = `state ${s}`;
    el.textContent = t(`state.${s}`);
  }
  $("stopplay").hidden = !stopShown();
  refreshControls();
}

// 停止播放 only while a reply's audio plays: from its first chunk until it is finished (the gaps
// between its sentences included), never while the first sentence is still being synthesised.
function stopShown() {
  if (playing.length) return true;
  const tn = currentReplyTurn();
  return !!(tn && tn.firstAudioAt && !tn.stopped && tn.no !== mutedTurn && !turnFinished(tn));
}

function refreshControls() {
  // Dormant: closed by the bridge's login or idle timeout; the next action reconnects.
  const open = conn === "open" || conn === "dormant";
  const talk = $("talk");
  talk.disabled = !open || (finalizing && !talking) || !window.isSecureContext;
  talk.setAttribute("aria-pressed", talking ? "true" : "false");
  talk.textContent = talking ? t("talkStop") : t("talkStart");
  talk.classList.toggle("on", talking);
  $("send").disabled = !open;
  $("textinput").disabled = !open;
  let hint = "";
  if (conn === "refused") hint = refusedOrigin ? t("hintOrigin") : t("hintRefused", { why: refusedWhy });
  else if (!open) hint = t("hintOffline");
  else if (finalizing && !talking) hint = t("hintFinalizing");
  else if (!window.isSecureContext) hint = t("hintInsecure", { origin: location.origin });
  if ($("talk-hint").textContent !== hint) $("talk-hint").textContent = hint;
  $("reconnect").hidden = !(conn === "closed" || conn === "connecting") || attempts === 0;
}

// --- connection badge and reconnect ------------------------------------------------------------

function setConn(text, cls) {
  $("conn").textContent = text;
  $("conn").className = `badge ${cls}`;
}

function scheduleReconnect() {
  attempts++;
  stats.reconnects = attempts;
  const delay = Math.min(10, 2 ** Math.min(attempts - 1, 4));  // 1, 2, 4, 8, 10 s
  retryAt = performance.now() + delay * 1000;
  const tick = () => {
    const s = Math.max(0, Math.ceil((retryAt - performance.now()) / 1000));
    setConn(t("reconnectIn", { s, n: attempts }), "bad");
  };
  tick();
  clearInterval(countdownTimer);
  countdownTimer = setInterval(tick, 1000);
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delay * 1000);
}

// --- the banner: engines, fallbacks, agent notice ------------------------------------------------

let bannerState = { daemon: null, agent: null };
const BANNER_SEEN = "s2s-banner-seen";  // localStorage: the banner items this browser has been shown
let bannerKey = "", bannerTouched = false, conversationBegun = false;

function showAgent(agent) {
  if (!agent) return;
  // hello, ready and /healthz each describe the agent; later ones add to what is known.
  agent = { ...(bannerState.agent || {}), ...agent };
  stats.agent = agent;
  bannerState.agent = agent;
  const b = $("agent");
  b.hidden = false;
  b.textContent = `${t("agentLabel")}: ${engineName(agent.kind)}`;
  b.className = "badge " + (agent.echo_fallback ? "warn" : "ok");
  renderBanner();
}

function showEngines(daemon) {
  if (!daemon || !daemon.engines) return;
  bannerState.daemon = daemon;
  const a = daemon.engines.asr, s = daemon.engines.tts;
  caps.asrEngine = a.engine;
  caps.ttsEngine = s.engine;
  if (typeof a.hotwords === "boolean") caps.asrHotwords = a.hotwords;
  if (Array.isArray(a.languages) && a.languages.length) caps.asrLanguages = a.languages;
  if (Array.isArray(s.languages) && s.languages.length) {
    caps.ttsLanguages = s.languages;
    if (!s.languages.includes("zh") && !s.languages.includes("auto")) caps.ttsNoChinese = true;
  }
  const b = $("engines");
  b.hidden = false;
  b.textContent = t("engines", { asr: `${engineName(a.engine)}@${deviceName(a.device)}`,
    tts: `${engineName(s.engine)}@${deviceName(s.device)}` });
  b.className = "badge " + ((daemon.fallbacks || []).length ? "warn" : "ok");
  applyCapabilities();
  renderBanner();
}

function fallbackLine(f) {
  const label = { "asr.engine": "asrLabel", "asr.device": "asrDeviceLabel", "tts.engine": "ttsLabel",
    "tts.device": "ttsDeviceLabel", "tts.voice": "ttsVoiceLabel" }[f.component];
  const isDevice = f.component.endsWith(".device");
  const to = isDevice ? deviceName(f.to) : engineName(f.to);
  const from = isDevice ? deviceName(f.from) : engineName(f.from);
  let mean = `mean.${f.component}`;
  if (f.component === "asr.engine" && caps.asrHotwords === false) mean += ".nohot";
  if (f.component === "tts.engine" && caps.ttsNoChinese) mean += ".nozh";
  const zh = `${STR.zh[label]}：${to}（${STR.zh.fallbackTag}，${STR.zh.was.replace("{from}", from)}）— ${STR.zh[mean]}`;
  const en = `${STR.en[label]}: ${to} (${STR.en.fallbackTag}, ${STR.en.was.replace("{from}", from)}) — ${STR.en[mean]}`;
  return UI === "zh" ? [zh, en] : [en, zh];
}

function renderBanner() {
  const { daemon, agent } = bannerState;
  const items = [];
  for (const f of (daemon && daemon.fallbacks) || []) {
    const [first, second] = fallbackLine(f);
    // /healthz before login carries no reason; with the token it does.
    items.push({ first, second, detail: `${f.component}: ${f.from} → ${f.to} (${f.when})${f.reason ? `: ${f.reason}` : ""}`,
      cls: "fallback", id: `${f.component}:${f.from}>${f.to}` });
  }
  if (caps.ttsNoChinese && !items.some((i) => i.first.includes(t("ttsLabel")))) {
    items.push({ first: STR[UI].ttsNoChinese, second: STR[UI === "zh" ? "en" : "zh"].ttsNoChinese, cls: "fallback",
      id: "tts:no-zh" });
  }
  if (agent && (agent.echo_fallback || agent.notice)) {
    const kind = agent.configured_kind || "?";
    const text = (u) => (agent.echo_fallback ? STR[u].echoNotice.replace("{kind}", kind) : STR[u].agentNotice);
    // The bridge's own notice is English; the echo case has its words above.
    items.push({ first: text(UI), second: text(UI === "zh" ? "en" : "zh"),
      detail: agent.echo_fallback ? "" : agent.notice || "", cls: "agent",
      id: agent.echo_fallback ? `agent:${kind}>echo` : "agent:notice" });
  }
  const box = $("banner");
  if (!items.length) { box.hidden = true; return; }
  const nFallbacks = items.filter((i) => i.cls === "fallback").length;
  const parts = [];
  if (nFallbacks) parts.push(t("bannerFallbacks", { n: nFallbacks }));
  if (agent && agent.echo_fallback) parts.push(t("bannerEcho"));
  $("banner-summary").textContent = "⚠ " + parts.join(" · ");
  const list = $("banner-list");
  list.textContent = "";
  for (const it of items) {
    const li = document.createElement("li");
    li.className = it.cls;
    const p = document.createElement("span");
    p.textContent = it.first;
    li.appendChild(p);
    const other = document.createElement("span");
    other.className = "other-lang";
    other.lang = UI === "zh" ? "en" : "zh-CN";
    other.textContent = it.second;
    li.appendChild(other);
    if (it.detail) {
      const d = document.createElement("small");
      d.className = "detail";
      d.lang = "en";
      d.textContent = it.detail;
      li.appendChild(d);
    }
    list.appendChild(li);
  }
  box.hidden = false;
  // Open on wide screens the first time these fallbacks are shown (on this browser), a one-line
  // summary after that, on phones, and once the conversation has begun: it is not the page.
  const key = items.map((i) => i.id).sort().join("|");
  if (key !== bannerKey) {
    bannerKey = key;
    const seen = bannerSeen();
    const fresh = items.some((i) => !seen.includes(i.id));
    if (!bannerTouched) box.open = fresh && !conversationBegun && window.matchMedia("(min-width: 641px)").matches;
    try {
      localStorage.setItem(BANNER_SEEN, JSON.stringify([...new Set([...seen, ...items.map((i) => i.id)])].slice(-50)));
    } catch (e) { /* storage off: the banner opens on every visit */ }
  }
}

function bannerSeen() {
  try {
    const v = JSON.parse(localStorage.getItem(BANNER_SEEN) || "[]");
    return Array.isArray(v) ? v.filter((x) => typeof x === "string") : [];
  } catch (e) {
    return [];
  }
}

// The user's own open/close wins; the first turn folds the banner away.
$("banner-summary").addEventListener("click", () => { bannerTouched = true; });
function beginConversation() {
  if (conversationBegun) return;
  conversationBegun = true;
  if (!bannerTouched) $("banner").open = false;
}

// --- capabilities: hotwords, languages ------------------------------------------------------------

function applyCapabilities() {
  const hw = $("hotwords");
  if (caps.asrHotwords === false) {
    hw.disabled = true;
    $("hotwords-hint").textContent = t("hotwordsUnsupported", { engine: engineName(caps.asrEngine || "?") });
  } else if (caps.asrHotwords === true) {
    hw.disabled = false;
    $("hotwords-hint").textContent = "";
  }
  const sel = $("language");
  if (caps.asrLanguages) {
    const missing = [];
    for (const o of sel.options) {
      o.disabled = !caps.asrLanguages.includes(o.value);
      if (o.disabled) missing.push(LANG_NAME[o.value] || o.value);
    }
    // The default follows the engines: Chinese where offered, else what the engine offers.
    if (sel.selectedOptions[0] && sel.selectedOptions[0].disabled) {
      const pick = ["zh", "auto", "en"].find((l) => caps.asrLanguages.includes(l)) || caps.asrLanguages[0];
      sel.value = pick;
    }
    setLanguageHint(missing.length ? t("langNotOffered", { langs: missing.join(", ") }) : "");
  }
  if (caps.ttsNoChinese) setLanguageHint(t("ttsNoChinese"));
}

function setLanguageHint(text) {
  $("language-hint").textContent = text;
}

function checkLanguage(text, reported) {
  const sel = $("language").value;
  if (sel === "auto" || !text) return;
  let spoken = reported;
  if (!spoken) {
    const cjk = (text.match(CJK_ALL) || []).length;
    const latin = (text.match(/[A-Za-z]/g) || []).length;
    if (cjk >= 2 && cjk * 2 >= latin) spoken = "zh";
    else if (cjk === 0 && latin >= 4) spoken = "en";
  }
  if (!spoken) return;
  if (spoken === "zh" && sel !== "zh") setLanguageHint(t("langMismatchZh", { lang: LANG_NAME[sel] }));
  else if (spoken !== "zh" && sel === "zh") setLanguageHint(t("langMismatchEn"));
  else if (!caps.ttsNoChinese) setLanguageHint("");
}

$("language").addEventListener("change", () => { if (!caps.ttsNoChinese) setLanguageHint(""); });

// --- errors ----------------------------------------------------------------------------------

let errGroup = null;  // {key, count}
const errHistory = [];

function errorText(code, source) {
  if (source === "agent" && STR.zh[`err.agent.${code}`]) return t(`err.agent.${code}`);
  if (STR.zh[`err.${code}`]) return t(`err.${code}`);
  return t("err.other");
}

function statusError(code, source, message) {
  const key = `${source}/${code}`;
  if (errGroup && errGroup.key === key) errGroup.count++;
  else errGroup = { key, count: 1 };
  const text = errorText(code, source) + (errGroup.count > 1 ? t("count", { n: errGroup.count }) : "");
  $("error-text").textContent = text;
  errHistory.push([errorText(code, source), `[${key}] ${message}`]);
  while (errHistory.length > 8) errHistory.shift();
  const list = $("error-list");
  list.textContent = "";
  for (const [said, raw] of errHistory) {
    const li = document.createElement("li");
    detailLine(li, said, raw);
    list.appendChild(li);
  }
  $("errors").hidden = false;
}

$("error-close").addEventListener("click", () => {
  $("errors").hidden = true;
  errGroup = null;
  errHistory.length = 0;
});

function addError(code, message, source = "page") {
  stats.errors.push({ code, message, source });
  statusError(code, source, message);
}

function onErrorEvent(ev) {
  stats.errors.push({ code: ev.code, message: ev.message, source: ev.source });
  // The bridge closes an unused connection; the page reconnects on the next action, quietly.
  if (ev.code === "login_timeout" || ev.code === "idle_timeout") return;
  // Audio refused while the microphone heard only silence: nothing said was lost; not an error to show.
  if (ev.code === "busy" && ev.source === "asr" && talking && sessionReady && !droppedSpeech()) {
    stats.errors[stats.errors.length - 1].silence = true;
    return;
  }
  // A turn's error stays on its bubble: agent and synthesis errors belong to the reply in progress.
  const turn = (ev.source === "agent" || ev.source === "tts")
    ? ((ev.turn != null && turnFor(ev.turn)) || currentReplyTurn()) : null;
  if (turn) {
    turn.errors.push(ev);
    if (ev.source === "agent") {
      ensureAgentBubble(turn);
      setBubbleError(turn, t("agentFailed", { msg: errorText(ev.code, "agent") }),
        [[errorText(ev.code, "agent"), `[agent/${ev.code}] ${ev.message}`]]);
    }
    // The English voice's refusal of a Chinese sentence: from now on the page knows.
    if (ev.source === "tts" && ev.code === "bad_text" && /nothing speakable/.test(ev.message || "") &&
        CJK.test(`${ev.message} ${speaking ? speaking.text : ""}`)) {
      learnNoChinese();
    }
    return;
  }
  // A turn the bridge would not start (too many a minute): the newest waiting one; say so on it.
  if (ev.code === "rate_limited" && waiting.length) {
    const turn = waiting.pop();
    turn.closed = true;
    setBubbleNote(turn.userLi, "error", "⚠ " + errorText(ev.code, ev.source),
      [[errorText(ev.code, ev.source), `[${ev.source}/${ev.code}] ${ev.message}`]]);
    refreshState();
    return;
  }
  // A start that the engine refused: say why, fix what can be fixed, and try again once.
  if (talking && !sessionReady && ev.source === "asr") {
    if (ev.code === "unsupported" && startHotwords.length) {
      caps.asrHotwords = false;
      applyCapabilities();
      sendStart();
      return;
    }
    stopMic();
  }
  statusError(ev.code, ev.source, ev.message);
  refreshState();
}

function learnNoChinese() {
  if (caps.ttsNoChinese) return;
  caps.ttsNoChinese = true;
  applyCapabilities();
  renderBanner();
}

// --- the conversation log ----------------------------------------------------------------------

function bubble(cls, text) {
  const li = document.createElement("li");
  li.className = cls;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = (cls.startsWith("user") ? t("you") : t("assistant")) + (UI === "zh" ? "：" : ": ");
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("span");
  meta.className = "meta";
  li.append(who, body, meta);
  $("log").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function setText(li, text) { li.querySelector(".text").textContent = text; }

function addMeta(li, cls, text) {
  let el = li.querySelector(`.meta .${cls}`);
  if (!el) {
    el = document.createElement("span");
    el.className = cls;
    li.querySelector(".meta").appendChild(el);
  }
  el.textContent = text;
  return el;
}

function setBubbleNote(li, cls, text, detail) {
  let note = li.querySelector(`.note.${cls}`);
  if (!note) {
    note = document.createElement("div");
    note.className = `note ${cls}`;
    li.appendChild(note);
  }
  note.textContent = "";
  const s = document.createElement("span");
  s.className = "note-text";
  s.textContent = text;
  note.appendChild(s);
  if (detail && detail.length) {
    const d = document.createElement("details");
    const sum = document.createElement("summary");
    sum.textContent = t("details");
    d.append(sum);
    for (const [said, raw] of detail) {
      const line = document.createElement("span");
      line.className = "detail-line";
      detailLine(line, said, raw);
      d.append(line);
    }
    note.appendChild(d);
  }
}

// Behind 详情: what it means in the page's language, beside the raw (English) message.
function detailLine(el, said, raw) {
  const a = document.createElement("span");
  a.className = "said";
  a.textContent = said;
  const b = document.createElement("span");
  b.className = "raw";
  b.lang = "en";
  b.textContent = raw;
  el.append(a, " ", b);
}

// A synthesis error's meaning: the English voice's refusal of Chinese text says so.
function ttsSaid(code, message) {
  if (code === "bad_text" && /nothing speakable/.test(message || "") && CJK.test(message || "")) return t("whyNoChinese");
  return errorText(code, "tts");
}

function setBubbleError(turn, text, detail) {
  setBubbleNote(turn.agentLi, "error", "⚠ " + text, detail);
}

function newTurn(source, userLi, at) {
  beginConversation();
  const turn = { no: null, source, userLi, agentLi: null, text: "", at, firstAudioAt: 0,
    agentDone: false, started: new Set(), ended: new Set(), spoken: 0, failed: [], partial: 0,
    interrupted: false, stopped: false, errors: [], closed: false };
  waiting.push(turn);
  return turn;
}

function turnFinished(turn) {
  if (!turn) return true;
  if (turn.closed || turn.interrupted) return true;
  if (!turn.agentDone) return false;
  for (const i of turn.started) if (!turn.ended.has(i)) return false;
  return true;
}

function currentReplyTurn() {
  let last = null;
  for (const tn of allTurns()) if (!turnFinished(tn)) last = tn;
  return last || (speaking ? turnFor(speaking.turn) : null) || null;
}

function ensureAgentBubble(turn) {
  if (!turn.agentLi) turn.agentLi = bubble("agent", turn.text);
  return turn.agentLi;
}

// Spoken, partly spoken or not spoken: marked on the reply's bubble for good.
function updateSpeechNote(turn) {
  if (!turn.agentLi) return;
  const failed = turn.failed.length;
  if (!failed && !turn.partial) return;
  const none = turn.spoken === 0 && turn.partial === 0;
  const label = none ? t("notSpoken") : t("partSpoken");
  const codes = turn.failed.map((f) => f.code);
  let why = t("whyTtsFailed");
  if (caps.ttsNoChinese || turn.partial) why = t("whyNoChinese");
  else if (codes.includes("bad_text")) why = t("err.bad_text");
  else if (codes.some((c) => c === "unavailable" || c === "timeout" || c === "shutting_down")) why = t("whyTtsDown");
  const detail = turn.errors.filter((e) => e.source === "tts").map((e) => [ttsSaid(e.code, e.message), `[tts/${e.code}] ${e.message}`])
    .concat(turn.failed.filter((f) => !turn.errors.some((e) => e.source === "tts"))
      .map((f) => [ttsSaid(f.code, f.text), `[tts/${f.code}] ${f.text}`]));
  setBubbleNote(turn.agentLi, "speech", `⚠ ${label}${UI === "zh" ? "：" : ": "}${why}`, detail);
  turn.agentLi.classList.add(none ? "not-spoken" : "part-spoken");
  turn.agentLi.dataset.spoken = none ? "none" : "partly";
}

// A sentence that has CJK text and came back much shorter than anything that reads it aloud.
function soundsPartial(text, seconds) {
  const cjk = (text.match(CJK_ALL) || []).length;
  if (!cjk) return false;
  if (caps.ttsNoChinese) return true;
  const words = (text.replace(CJK_ALL, " ").match(/[A-Za-z]+|\d+/g) || []).length;
  // Read aloud, a Chinese character takes 0.15-0.3 s; an English voice that skips them
  // leaves ~0.02 s per character (the digits and Latin words it could read).
  return seconds < (cjk + words) * 0.04;
}

// --- websocket -----------------------------------------------------------------------------

function connect() {
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;  // the token goes in the first message
  conn = "connecting";
  setConn(attempts ? t("reconnecting", { n: attempts }) : t("connConnecting"), "warn");
  refreshState();
  const sock = ws = new WebSocket(url);
  let opened = false;
  sock.binaryType = "arraybuffer";
  sock.onopen = () => {
    if (sock !== ws) return;
    opened = true;
    conn = "open";
    attempts = 0;
    stats.connected = true;
    waiting.length = 0;
    turns.clear();
    setConn(t("connOpen"), "ok");
    loadHealth();
    refreshState();
    const todo = onOpen;
    onOpen = null;
    if (todo) todo();
  };
  sock.onclose = (e) => {
    if (sock !== ws) return;
    stats.connected = false;
    stats.ready = false;
    sessionReady = false;
    stopMic();
    stopPlayback();
    endFinalizing();
    for (const tn of allTurns()) tn.closed = true;
    if (utter) { utter.li.remove(); utter = null; }
    speaking = null;
    if ([1008, 1009, 1011, 1013].includes(e.code) && e.reason !== "login timeout") addError(`ws_${e.code}`, `closed ${e.code} ${e.reason || ""}`, "bridge");
    if ((e.code === 1000 && e.reason === "idle timeout") || e.reason === "login timeout") {
      conn = "dormant";
      setConn(t("connDormant"), "warn");
    } else if (e.code === 1008 && e.reason !== "client too slow") {
      // Refused on purpose (token, too slow): retrying would be refused again.
      conn = "refused";
      refusedWhy = e.reason || String(e.code);
      setConn(t("refused"), "bad");
    } else if (!opened) {
      // Refused at the handshake or unreachable: a browser cannot read a refused upgrade's
      // status, so ask the bridge whether it refuses this page's origin (then retrying is pointless).
      conn = "closed";
      originRefusal().then((why) => {
        if (sock !== ws) return;
        if (why) showOriginRefused(why);
        else scheduleReconnect();
        refreshState();
      });
    } else {
      conn = "closed";
      scheduleReconnect();
    }
    refreshState();
  };
  sock.onmessage = (e) => {
    if (sock !== ws) return;
    if (typeof e.data === "string") onEvent(JSON.parse(e.data));
    else onAudio(e.data);
  };
}

// /origin-check answers whether the bridge lets this page's origin open /ws (null: it does, or
// the bridge cannot be reached or is too old to say: keep retrying).
async function originRefusal() {
  try {
    const r = await fetch(`origin-check?origin=${encodeURIComponent(location.origin)}`, { cache: "no-store" });
    if (!r.ok) return null;
    const j = await r.json();
    return j && j.allowed === false ? j : null;
  } catch (e) {
    return null;
  }
}

function isLoopback(host) {
  return host === "localhost" || host.endsWith(".localhost") || host === "[::1]" || /^127\./.test(host);
}

function showOriginRefused(why) {
  conn = "refused";
  refusedOrigin = why;
  refusedWhy = "origin not allowed";
  clearInterval(countdownTimer);
  clearTimeout(retryTimer);
  setConn(t("refused"), "bad");
  const origin = location.origin;
  $("access-why").textContent = t("accessWhy", { origin });
  $("access-fix").textContent = t("accessFix", { origin, port: location.port || (location.protocol === "https:" ? 443 : 80) });
  const micNeedsHttps = location.protocol !== "https:" && !isLoopback(location.hostname);
  $("access-mic").textContent = micNeedsHttps ? t("accessMic", { host: location.host }) : "";
  $("access-mic").hidden = !micNeedsHttps;
  $("access").hidden = false;
  stats.originRefused = why;
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

function sendStart() {
  const wanted = $("hotwords").disabled ? [] : $("hotwords").value.split(/[,，、\s]+/).filter(Boolean);
  // Hotwords on an engine that cannot use them make the whole session refused; when the page
  // does not know yet, it opens the session without them and adds them once `ready` says yes.
  let hotwords = wanted;
  hotwordProbe = null;
  if (wanted.length && caps.asrHotwords !== true) { hotwordProbe = wanted; hotwords = []; }
  startHotwords = hotwords;
  sessionReady = false;
  stats.ready = false;
  const msg = { type: "start", language: $("language").value, token: TOKEN || undefined };
  if (hotwords.length) msg.hotwords = hotwords;
  stats.starts.push({ language: msg.language, hotwords });
  send(msg);
}

function onEvent(ev) {
  switch (ev.type) {
    case "hello":
      showAgent(ev.agent);
      newSpeculationCounts();
      break;
    case "ready":
      outRate = ev.output_sample_rate || outRate;
      showAgent(ev.agent);
      if (typeof ev.hotwords === "boolean") { caps.asrHotwords = ev.hotwords; applyCapabilities(); }
      if (hotwordProbe && ev.hotwords === true && talking) { sendStart(); break; }
      hotwordProbe = null;
      if (ev.speculate === true) renderSpeculation();  // replies may be prepared before the final
      sessionReady = talking;
      stats.ready = talking;
      break;
    case "speech_start":
      if (!utter) utter = { li: bubble("user placeholder", t("listeningPh")), quiet: false, lastLoud: performance.now() };
      utter.quiet = false;
      utter.lastLoud = performance.now();
      break;
    case "partial":
      stats.partials++;
      if (!ev.text) break;
      if (!utter) utter = { li: bubble("user placeholder", ""), quiet: false, lastLoud: performance.now() };
      setText(utter.li, ev.text);
      break;
    case "final": {
      stats.finals.push(ev.text);
      const text = (ev.text || "").trim();
      const li = utter ? utter.li : null;
      utter = null;
      if (ev.reason === "finalize") endFinalizing();
      if (!text) { if (li) li.remove(); break; }
      const userLi = li || bubble("user", text);
      userLi.className = "user";
      setText(userLi, text);
      newTurn("speech", userLi, performance.now());
      if (ev.latency_ms != null) {
        const ms = Math.round(ev.latency_ms);
        $("lat-asr").textContent = `${ms} ms`;
        addMeta(userLi, "lat", t("latAsrLabel", { ms }));
      }
      checkLanguage(text, ev.language);
      break;
    }
    case "user_text": {
      const at = typedAt.length ? typedAt.shift() : performance.now();
      newTurn("text", bubble("user typed", ev.text), at);
      break;
    }
    case "agent_delta": {
      const turn = turnFor(ev.turn);
      if (!turn) break;
      turn.text += ev.text;
      setText(ensureAgentBubble(turn), turn.text);
      break;
    }
    case "agent_done": {
      stats.replies.push(ev.text);
      const turn = turnFor(ev.turn);
      if (!turn) break;
      if (ev.text && ev.text !== turn.text) { turn.text = ev.text; }
      ensureAgentBubble(turn);
      setText(turn.agentLi, turn.text);
      turn.agentDone = true;
      break;
    }
    case "tts_start":
      outRate = ev.sample_rate || outRate;
      speaking = { turn: ev.turn, sentence: ev.sentence, text: ev.text || "", samples: 0 };
      if (turnFor(ev.turn)) turnFor(ev.turn).started.add(ev.sentence);
      break;
    case "tts_end": {
      const turn = turnFor(ev.turn);
      const s = speaking && speaking.turn === ev.turn && speaking.sentence === ev.sentence ? speaking : null;
      speaking = null;
      if (!turn) break;
      turn.ended.add(ev.sentence);
      if (ev.error) {
        turn.failed.push({ code: ev.error, text: s ? s.text : "" });
      } else if (s && soundsPartial(s.text, s.samples / outRate)) {
        turn.partial++;
      } else {
        turn.spoken++;
      }
      updateSpeechNote(turn);
      break;
    }
    case "first_audio":
      showFirstAudio(ev);
      break;
    case "speculation":
      specNow = { released: count(ev.released), cancelled: count(ev.cancelled), turns: count(ev.turns) };
      renderSpeculation();
      break;
    case "interrupted": {
      stats.interrupted++;
      stopPlayback();
      const turn = ev.turn > 0 ? turnFor(ev.turn) : null;
      if (turn) {
        turn.interrupted = true;
        if (turn.agentLi) { turn.agentLi.classList.add("interrupted"); addMeta(turn.agentLi, "flag", t("interrupted")); }
      }
      speaking = null;
      break;
    }
    case "error":
      onErrorEvent(ev);
      break;
    default:
      break;
  }
  refreshState();
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
  const pcm = new Int16Array(buf);
  if (speaking) speaking.samples += pcm.length;
  const turn = speaking ? turnFor(speaking.turn) : null;
  if (turn && !turn.firstAudioAt && pcm.length) {
    turn.firstAudioAt = performance.now();
    const ms = Math.round(turn.firstAudioAt - turn.at);
    if (turn.source === "text") {
      stats.textLatencies.push(ms);
      $("lat-text").textContent = `${ms} ms`;
      addMeta(ensureAgentBubble(turn), "lat", t("latTypedLabel", { ms }));
    } else {
      stats.latencies.push(ms);
      // The bridge's speech end -> first audio is the turn's one figure (showFirstAudio); only
      // a bridge that sends none leaves the page's own count on the bubble.
      if (!turn.e2eShown) {
        $("lat-tts").textContent = `${ms} ms`;
        addMeta(ensureAgentBubble(turn), "lat", t("latFirstAudio", { ms }));
      }
    }
  }
  if (pcm.length === 0 || (speaking && speaking.turn === mutedTurn)) return;
  const c = ensureContext();
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
  src.onended = () => {
    playing = playing.filter((s) => s !== src);
    refreshState();
  };
  refreshState();
}

// --- speech end -> first audio, speculative replies -------------------------------------------

// The bridge's clock: from when the user's speech ended (its audio reached the bridge) to the
// reply's first audio; `speculative` when the reply was prepared before the final and released.
function showFirstAudio(ev) {
  if (typeof ev.speech_end_ms !== "number" || !Number.isFinite(ev.speech_end_ms)) return;
  const speculative = ev.speculative === true;
  stats.speechEndLatencies.push({ ms: ev.speech_end_ms, speculative });
  const s = (Math.max(0, ev.speech_end_ms) / 1000).toFixed(2);
  // One figure per turn: the bubble and the line below say the same thing, in the same words.
  $("lat-e2e").textContent = t("seconds", { s });
  if (typeof ev.latency_ms === "number" && Number.isFinite(ev.latency_ms)) {
    $("lat-tts").textContent = `${Math.round(Math.max(0, ev.latency_ms))} ms`;  // final -> first audio, same clock
  }
  $("spec-last").textContent = speculative ? t("specLast") : "";
  const turn = turnFor(ev.turn);
  if (!turn) return;
  turn.e2eShown = true;
  const li = ensureAgentBubble(turn);
  li.dataset.speculative = speculative ? "true" : "false";
  addMeta(li, "lat", `${t("latE2E")} ${t("seconds", { s })}`);
}

// The bridge counts per connection; the page adds up its connections (a reconnect starts at 0).
const ZERO = { released: 0, cancelled: 0, turns: 0 };
let specBefore = { ...ZERO }, specNow = { ...ZERO };
const count = (x) => (Number.isInteger(x) && x > 0 ? x : 0);

function newSpeculationCounts() {
  for (const k of Object.keys(ZERO)) specBefore[k] += specNow[k];
  specNow = { ...ZERO };
}

function renderSpeculation() {
  const c = {};
  for (const k of Object.keys(ZERO)) c[k] = specBefore[k] + specNow[k];
  stats.speculation = c;
  let text = t("specValue", { r: c.released, c: c.cancelled });
  if (c.turns) text += t("specPerTurn", { p: (c.cancelled / c.turns).toFixed(2) });
  $("spec").textContent = text;
  $("spec-row").hidden = false;
  $("stats-more").hidden = false;
}

function stopPlayback() {
  const nodes = playing;
  playing = [];
  for (const s of nodes) { s.onended = null; try { s.stop(); } catch (e) { /* already stopped */ } }
  playHead = 0;
}

$("stopplay").addEventListener("click", () => {
  const turn = currentReplyTurn() || (speaking && turnFor(speaking.turn));
  if (turn) {
    mutedTurn = turn.no;
    turn.stopped = true;
    if (turn.agentLi) addMeta(turn.agentLi, "flag", t("playbackStopped"));
  }
  // The bridge stops synthesising the rest of the reply too (its text still comes).
  const msg = { type: "stop_playback" };
  if (turn && turn.no != null) msg.turn = turn.no;
  send(msg);
  stopPlayback();
  refreshState();
  $("talk").disabled ? $("textinput").focus() : $("talk").focus();
});

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
  if (!talking) { micStream.getTracks().forEach((tr) => tr.stop()); micStream = null; return; }
  micSource = c.createMediaStreamSource(micStream);
  micNode = new AudioWorkletNode(c, "pcm16-capture", { processorOptions: { outRate: 16000, chunkMs: 40 } });
  micNode.port.onmessage = (e) => {
    if (!ws || ws.readyState !== WebSocket.OPEN || !sessionReady) return;
    const pcm = new Int16Array(e.data);
    let peak = 0;
    for (let i = 0; i < pcm.length; i += 8) peak = Math.max(peak, Math.abs(pcm[i]));
    $("level").value = Math.min(1, (peak / 32768) * 2);
    if (peak > LOUD) lastLoudSent = performance.now();
    // The engine says when speech starts; the page sees when it goes quiet (recognising).
    if (utter) {
      const now = performance.now();
      if (peak > LOUD) utter.lastLoud = now;
      const quiet = now - utter.lastLoud > 600;
      if (quiet !== utter.quiet) { utter.quiet = quiet; refreshState(); }
    }
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

// What getUserMedia's refusal means for the user (the status line says what to do about it).
function micErrorCode(e) {
  const name = (e && e.name) || "";
  if (!window.isSecureContext || !navigator.mediaDevices) return "mic_insecure";
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") return "mic_denied";
  if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") return "mic_missing";
  if (name === "NotReadableError" || name === "AbortError" || name === "TrackStartError") return "mic_busy";
  return "microphone";
}

function stopMic() {
  talking = false;
  sessionReady = false;
  stats.ready = false;
  if (micSource) micSource.disconnect();
  if (micNode) { micNode.port.onmessage = null; micNode.disconnect(); }
  if (micStream) micStream.getTracks().forEach((tr) => tr.stop());
  micSource = micNode = micStream = null;
  $("level").value = 0;
  refreshState();
}

// A frame whose peak passes this (of 32768, about -30 dBFS) has sound in it, not silence.
const LOUD = 1000;
// Audio refused `busy` is what was sent within this window before the refusal came back.
const DROPPED_WINDOW_MS = 2000;

// Whether audio the daemon (or the bridge) refused as `busy` can have held speech: an utterance
// in progress, or sound sent just before. Dropped silence loses nothing the user said.
function droppedSpeech() {
  return !!utter || performance.now() - lastLoudSent < DROPPED_WINDOW_MS;
}

function endFinalizing() {
  finalizing = false;
  clearTimeout(finalizeTimer);
}

function whenConnected(action) {
  if (conn === "open") return true;
  if (conn === "dormant") { onOpen = action; connect(); }
  return false;
}

$("talk").addEventListener("click", async () => {
  if (!talking) {
    if (finalizing || !whenConnected(() => $("talk").click())) return;
    talking = true;
    sendStart();
    refreshState();
    try {
      await startMic();
    } catch (e) {
      addError(micErrorCode(e), `${e && e.name ? e.name + ": " : ""}${String((e && e.message) || e)}`);
      send({ type: "stop" });
      stopMic();
    }
  } else {
    send({ type: "stop" });
    // The last final comes after `stop`; a new `start` before it would lose that transcript.
    finalizing = true;
    clearTimeout(finalizeTimer);
    finalizeTimer = setTimeout(() => { endFinalizing(); if (utter) { utter.li.remove(); utter = null; } refreshState(); }, 30000);
    if (utter) utter.quiet = true;
    stopMic();
  }
});

$("textform").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("textinput").value.trim();
  if (!text || !whenConnected(() => $("textform").requestSubmit())) return;
  ensureContext();
  typedAt.push(performance.now());
  send({ type: "text", text, token: TOKEN || undefined });
  $("textinput").value = "";
});

$("reconnect").addEventListener("click", () => { if (conn !== "open") connect(); });

// Show the bridge's health (engines, fallbacks, agent) before anything is said.
function loadHealth() {
  fetch("healthz", { cache: "no-store" }).then((r) => r.json()).then((h) => {
    if (h.agent) showAgent(h.agent);
    if (h.daemon) showEngines(h.daemon);
    if (h.daemon && h.daemon.reachable === false) addError("daemon_unavailable", "healthz: daemon not reachable", "bridge");
    stats.health = h;
  }).catch(() => { stats.health = null; });
}

applyStrings();
refreshState();
connect();
