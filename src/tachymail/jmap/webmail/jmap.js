// A small JMAP client (RFC 8620 core, RFC 8621 mail) for the webmail page: sign-in,
// the session resource, method calls, blob upload and download, and the push channel.
// It speaks only to the server that served the page.

export const CORE = "urn:ietf:params:jmap:core";
export const MAIL = "urn:ietf:params:jmap:mail";
export const SUBMISSION = "urn:ietf:params:jmap:submission";

const TOKEN_KEY = "tachymail.token";

// A request the server refused: 401 means the token is no longer good.
export class JmapError extends Error {
  constructor(message, status = 0, type = "") {
    super(message);
    this.status = status;
    this.type = type;
  }
}

// Fill an RFC 6570 level-1 template such as downloadUrl's {accountId}/{blobId}/{name}.
export function expand(template, values) {
  return template.replace(/\{(\w+)\}/g, (_, key) =>
    encodeURIComponent(values[key] === undefined ? "" : String(values[key])));
}

async function problem(response) {
  // RFC 7807 problem (JMAP) or the http package's {"error": {...}}: a message for a person.
  try {
    const body = await response.json();
    if (body.detail) return body.detail;
    if (body.title) return body.title;
    if (body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

export class JmapClient {
  constructor() {
    this.token = sessionStorage.getItem(TOKEN_KEY) || "";
    this.session = null;
    this.accountId = "";
    this.events = null;
  }

  get signedIn() { return Boolean(this.token); }

  // POST /jmap/login; keeps the bearer token for this browser tab only.
  async login(username, password) {
    const response = await fetch("/jmap/login", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ username, password }),
      credentials: "omit",
    });
    if (!response.ok) throw new JmapError(await problem(response), response.status);
    const body = await response.json();
    if (!body.token) throw new JmapError("the server sent no token", response.status);
    this.token = body.token;
    this.accountId = body.accountId || "";
    sessionStorage.setItem(TOKEN_KEY, this.token);
  }

  logout() {
    this.closeEvents();
    this.token = "";
    this.session = null;
    sessionStorage.removeItem(TOKEN_KEY);
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.token}`, ...extra };
  }

  async fetchSession() {
    const response = await fetch("/.well-known/jmap", {
      headers: this.headers({ Accept: "application/json" }),
      credentials: "omit",
    });
    if (!response.ok) throw new JmapError(await problem(response), response.status);
    this.session = await response.json();
    const primary = this.session.primaryAccounts || {};
    this.accountId = primary[MAIL] || this.accountId || Object.keys(this.session.accounts || {})[0];
    return this.session;
  }

  get capabilities() {
    return (this.session && this.session.capabilities) || {};
  }

  // One API request: calls is a list of [name, args, callId]; accountId is filled in.
  // Returns the responses by callId; a method-level "error" response throws.
  async call(calls, using = [CORE, MAIL, SUBMISSION]) {
    const methodCalls = calls.map(([name, args, id]) => [
      name, { accountId: this.accountId, ...args }, id]);
    const response = await fetch(this.session.apiUrl, {
      method: "POST",
      headers: this.headers({ "Content-Type": "application/json", Accept: "application/json" }),
      body: JSON.stringify({ using: using.filter((u) => u in this.capabilities || u === CORE), methodCalls }),
      credentials: "omit",
    });
    if (!response.ok) throw new JmapError(await problem(response), response.status);
    const body = await response.json();
    const results = {};
    for (const [name, args, id] of body.methodResponses || []) {
      if (name === "error") {
        throw new JmapError(`${args.type}${args.description ? ": " + args.description : ""}`, 200, args.type);
      }
      results[id] = args;
    }
    return results;
  }

  async upload(file) {
    const url = expand(this.session.uploadUrl, { accountId: this.accountId });
    const response = await fetch(url, {
      method: "POST",
      headers: this.headers({ "Content-Type": file.type || "application/octet-stream" }),
      body: file,
      credentials: "omit",
    });
    if (!response.ok) throw new JmapError(await problem(response), response.status);
    return response.json();
  }

  downloadUrl(blobId, name, type) {
    return expand(this.session.downloadUrl, {
      accountId: this.accountId, blobId, name: name || "attachment",
      type: type || "application/octet-stream",
    });
  }

  // The blob's bytes with the bearer token (a plain link could not send it).
  async download(blobId, name, type) {
    const response = await fetch(this.downloadUrl(blobId, name, type), {
      headers: this.headers(), credentials: "omit",
    });
    if (!response.ok) throw new JmapError(await problem(response), response.status);
    return response.blob();
  }

  // The push channel (RFC 8620 §7.3). EventSource cannot send headers, so the token goes
  // in the URL as access_token. onChange gets each StateChange's "changed" object.
  openEvents(onChange, onTrouble) {
    this.closeEvents();
    const template = this.session && this.session.eventSourceUrl;
    if (!template) return;
    let url = expand(template, { types: "*", closeafter: "no", ping: "60" });
    url += (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(this.token);
    const source = new EventSource(url);
    source.addEventListener("state", (event) => {
      try {
        const change = JSON.parse(event.data);
        onChange(change.changed || {});
      } catch (_) { /* a malformed event is ignored: the next one refreshes */ }
    });
    source.onerror = () => { if (onTrouble) onTrouble(source.readyState); };
    this.events = source;
  }

  closeEvents() {
    if (this.events) this.events.close();
    this.events = null;
  }
}
