// AudioWorklet: microphone samples (the context's rate, e.g. 48 kHz) -> 16 kHz PCM16 mono.
// Posts an ArrayBuffer of PCM16 little-endian every `chunkMs` (default 40 ms) to the page.
//
// Downsampling averages the input over each output sample's span (a box filter), which is
// cheap and removes most of what would alias; upsampling (rare: a 8 kHz device) interpolates.

class PCM16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.outRate = o.outRate || 16000;
    this.ratio = sampleRate / this.outRate;       // input samples per output sample
    this.chunk = Math.round(this.outRate * (o.chunkMs || 40) / 1000);
    this.out = new Int16Array(this.chunk);
    this.n = 0;
    this.pos = 0;        // fractional input position of the next output sample, relative to this block
    this.acc = 0;        // box filter: running sum and count (downsampling)
    this.cnt = 0;
    this.prev = 0;       // last input sample of the previous block (upsampling)
    this.enabled = true;
    this.port.onmessage = (e) => { if (e.data && e.data.enabled !== undefined) this.enabled = !!e.data.enabled; };
  }

  push(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.out[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.n === this.chunk) {
      const buf = this.out.buffer;
      this.port.postMessage(buf, [buf]);
      this.out = new Int16Array(this.chunk);
      this.n = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !this.enabled) return true;
    // Mix down to mono.
    const len = input[0].length;
    let x = input[0];
    if (input.length > 1) {
      x = new Float32Array(len);
      for (let c = 0; c < input.length; c++) for (let i = 0; i < len; i++) x[i] += input[c][i] / input.length;
    }
    if (this.ratio >= 1) {
      // Each output sample = mean of the input samples in its span.
      for (let i = 0; i < len; i++) {
        this.acc += x[i];
        this.cnt++;
        this.pos += 1;
        if (this.pos >= this.ratio) {
          this.pos -= this.ratio;
          this.push(this.acc / this.cnt);
          this.acc = 0;
          this.cnt = 0;
        }
      }
    } else {
      // Linear interpolation between input samples.
      while (this.pos < len) {
        const i = Math.floor(this.pos);
        const f = this.pos - i;
        const a = i === 0 ? this.prev : x[i - 1];
        const b = x[i];
        this.push(a + (b - a) * f);
        this.pos += this.ratio;
      }
      this.pos -= len;
      this.prev = x[len - 1];
    }
    return true;
  }
}

registerProcessor("pcm16-capture", PCM16Capture);
