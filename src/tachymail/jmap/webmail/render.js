// Showing a message's body safely. Plain text is set as text, never as markup. HTML goes
// into a sandboxed srcdoc frame: no allow-scripts (no script, no on* handler runs), no
// allow-forms (no form is sent), no allow-same-origin (the frame cannot reach the page or
// its token), and a Content-Security-Policy of its own that loads nothing from the network
// (images only from data: URLs) until the reader asks for remote images.

export const FRAME_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";
export const FRAME_CSP_IMAGES = "default-src 'none'; style-src 'unsafe-inline'; img-src data: https: http:";

// The frame may open links in a new tab, outside the sandbox, and nothing else.
export const FRAME_SANDBOX = "allow-popups allow-popups-to-escape-sandbox";

function escapeAttribute(value) {
  return value.replace(/&/g, "&amp;").replace(/"/g, "&quot;").replace(/</g, "&lt;");
}

// Whether the HTML names a remote image the reader could choose to load (stylesheets,
// frames and the like never load: the frame's policy has no way to allow them).
export function hasRemoteContent(html) {
  return /(?:src|background|srcset|poster)\s*=\s*["']?\s*(?:https?:)?\/\//i.test(html)
    || /url\(\s*["']?\s*(?:https?:)?\/\//i.test(html);
}

// The srcdoc document: the policy first, so it is in force before any of the message's
// markup is parsed. The message's own markup is parsed by the browser inside the frame;
// the parent never puts it into its own DOM.
export function frameDocument(html, allowImages) {
  const policy = allowImages ? FRAME_CSP_IMAGES : FRAME_CSP;
  return "<!doctype html><html><head>"
    + `<meta http-equiv="Content-Security-Policy" content="${escapeAttribute(policy)}">`
    + '<meta name="referrer" content="no-referrer">'
    + '<base target="_blank">'
    + "<style>html{color-scheme:light}body{margin:8px;font:15px/1.45 system-ui,sans-serif;"
    + "overflow-wrap:anywhere}img{max-width:100%;height:auto}</style>"
    + "</head><body>" + html + "</body></html>";
}

export function htmlFrame(html, allowImages) {
  const frame = document.createElement("iframe");
  frame.setAttribute("sandbox", FRAME_SANDBOX);
  frame.setAttribute("referrerpolicy", "no-referrer");
  frame.setAttribute("title", "Message body (HTML)");
  frame.className = "html-body";
  frame.srcdoc = frameDocument(html, allowImages);
  return frame;
}


// Images the message carries itself (multipart/related, "cid:" URLs, RFC 2392) become
// data: URLs, which the frame's policy allows: they show at once and load nothing from the
// network. *parts*: the message's body parts (with cid and blobId); *fetchBlob(part)*: the
// part's bytes as a Blob. The rewrite parses the HTML in an inert document (DOMParser
// runs no script and loads nothing); HTML without "cid:" is returned as it is.
export async function inlineCidImages(html, parts, fetchBlob, maxBytes = 4 * 1048576) {
  if (!/cid:/i.test(html)) return html;
  const byCid = new Map();
  for (const part of parts) {
    if (part.cid && part.blobId && /^image\//i.test(part.type || "") && (part.size || 0) <= maxBytes) {
      byCid.set(part.cid.replace(/^<|>$/g, "").toLowerCase(), part);
    }
  }
  if (byCid.size === 0) return html;
  const doc = new DOMParser().parseFromString(html, "text/html");
  const dataUrls = new Map();
  for (const element of doc.querySelectorAll("[src^='cid:' i], [background^='cid:' i]")) {
    for (const attribute of ["src", "background"]) {
      const value = element.getAttribute(attribute);
      if (!value || !/^cid:/i.test(value)) continue;
      const cid = decodeURIComponent(value.slice(4)).toLowerCase();
      const part = byCid.get(cid);
      if (!part) continue;
      if (!dataUrls.has(cid)) dataUrls.set(cid, fetchBlob(part).then(asDataUrl).catch(() => ""));
      element.setAttribute(attribute, await dataUrls.get(cid));
    }
  }
  return "<!doctype html>" + doc.documentElement.outerHTML;
}

function asDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// Plain text with its http(s) links made clickable; everything else stays text nodes.
export function textBlock(text) {
  const block = document.createElement("div");
  block.className = "text-body";
  const link = /\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]]/g;
  let last = 0;
  for (const match of text.matchAll(link)) {
    block.append(document.createTextNode(text.slice(last, match.index)));
    const a = document.createElement("a");
    a.href = match[0];
    a.textContent = match[0];
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    block.append(a);
    last = match.index + match[0].length;
  }
  block.append(document.createTextNode(text.slice(last)));
  return block;
}

// The text of an HTML body, for quoting in a reply or forward: parsed in an inert
// document (no script runs, nothing loads), line breaks kept where blocks end.
export function htmlToText(html) {
  const doc = new DOMParser().parseFromString(html, "text/html");
  for (const element of doc.querySelectorAll("script, style, head")) element.remove();
  for (const element of doc.querySelectorAll("br")) element.replaceWith("\n");
  for (const element of doc.querySelectorAll("p, div, li, tr, h1, h2, h3, h4, h5, h6, blockquote")) {
    element.append("\n");
  }
  return (doc.body ? doc.body.textContent : "").replace(/[ \t]+\n/g, "\n").replace(/\n{3,}/g, "\n\n").trim();
}
