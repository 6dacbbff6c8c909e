// The webmail page: sign-in, mailboxes, the message list, the reader, compose, push.
// Everything it knows comes from the JMAP API (jmap.js); it never puts a message's
// content into its own DOM as markup (see render.js).

import { JmapClient, JmapError } from "./jmap.js";
import { hasRemoteContent, htmlFrame, htmlToText, inlineCidImages, textBlock } from "./render.js";

const PAGE = 50;
const MAX_RELOAD = 500; // rows a refresh loads again at most (the rest come on scrolling)
const LIST_PROPERTIES = ["id", "threadId", "mailboxIds", "keywords", "from", "subject",
  "receivedAt", "preview", "hasAttachment"];
const READ_PROPERTIES = [...LIST_PROPERTIES, "to", "cc", "replyTo", "sentAt", "messageId",
  "inReplyTo", "references", "bodyValues", "textBody", "htmlBody", "attachments"];

const client = new JmapClient();
const $ = (id) => document.getElementById(id);

const state = {
  mailboxes: [],          // Mailbox objects, sorted for the list
  current: null,          // the mailbox shown, or null while searching
  search: "",             // the search text, "" when browsing a mailbox
  ids: [],                // the message ids loaded so far, in list order
  emails: new Map(),      // id -> the list properties of each loaded message
  total: null,            // the query's total, when the server told it
  loading: null,         // the ids array of the list a page is being loaded for
  selected: -1,           // index into ids of the focused row
  open: null,             // the Email shown in the reader
  openHtml: null,         // its HTML body, cid: images made data: URLs
  allowImages: false,
  identity: null,
  attachments: [],        // compose: {blobId, type, name, size}
  refreshTimer: 0,
  seen: {},               // type -> the state string of the last answer of that type
};

// --- small helpers ------------------------------------------------------------------------

function status(text) { $("status").textContent = text; }

function show(view) {
  $("signin-view").hidden = view !== "signin";
  $("mail-view").hidden = view !== "mail";
}

function mailboxByRole(role) {
  return state.mailboxes.find((m) => m.role === role) || null;
}

function formatAddress(a) {
  if (!a) return "";
  return a.name ? `${a.name} <${a.email}>` : a.email;
}

function formatAddresses(list) { return (list || []).map(formatAddress).join(", "); }

function shortSender(list) {
  const a = (list || [])[0];
  return a ? (a.name || a.email) : "(no sender)";
}

const dayFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });
const timeFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "short" });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "short" });

function listDate(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const today = new Date();
  return date.toDateString() === today.toDateString() ? timeFormat.format(date) : dayFormat.format(date);
}

// "Name <a@b>, c@d" -> [{name, email}]; throws on an address without "@".
function parseAddresses(text) {
  const out = [];
  for (const part of text.split(/[,;]/)) {
    const item = part.trim();
    if (!item) continue;
    const angle = item.match(/^(.*)<([^>]+)>$/);
    const email = (angle ? angle[2] : item).trim();
    const name = angle ? angle[1].trim().replace(/^"|"$/g, "") : "";
    if (!/^[^\s@]+@[^\s@]+$/.test(email)) throw new Error(`not an address: ${item}`);
    out.push(name ? { name, email } : { email });
  }
  return out;
}

async function guarded(action) {
  try {
    return await action();
  } catch (error) {
    if (error instanceof JmapError && error.status === 401) {
      signOut("Your session has ended; please sign in again.");
      return undefined;
    }
    console.error(error);
    status(`Error: ${error.message}`);
    return undefined;
  }
}

// --- sign-in ------------------------------------------------------------------------------

async function start() {
  if (!client.signedIn) {
    showSignin("");
    return;
  }
  try {
    await client.fetchSession();
  } catch (error) {
    // 401: the token is no good (expired, or the password changed); else the server is
    // unreachable for now, and the token is kept for the next try
    const expired = error instanceof JmapError && error.status === 401;
    if (expired) client.logout();
    showSignin(expired ? "" : `The server did not answer: ${error.message}`);
    return;
  }
  show("mail");
  $("who").textContent = client.session.username || "";
  await guarded(async () => {
    await loadMailboxes();
    const inbox = mailboxByRole("inbox") || state.mailboxes[0] || null;
    await openMailbox(inbox);
  });
  client.openEvents(onPush, onPushTrouble);
  $("message-list").focus();
}

function showSignin(message) {
  show("signin");
  $("signin-error").textContent = message;
  $("username").focus();
}

function signOut(message = "") {
  client.logout();
  clearTimeout(state.refreshTimer);
  state.current = null;
  state.search = "";
  state.identity = null;
  state.seen = {};
  state.mailboxes = [];
  state.ids = [];
  state.emails.clear();
  state.open = null;
  $("message-list").replaceChildren();
  $("mailbox-list").replaceChildren();
  $("reader").hidden = true;
  $("password").value = "";
  showSignin(message);
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const button = $("signin-submit");
  $("signin-error").textContent = "";
  button.disabled = true;
  try {
    await client.login(form.elements.username.value.trim(), form.elements.password.value);
    form.elements.password.value = "";
    await start();
  } catch (error) {
    $("signin-error").textContent = error.status === 401
      ? "The user name or password is not right." : `Sign-in failed: ${error.message}`;
    $("password").focus();
  } finally {
    button.disabled = false;
  }
});

$("signout-button").addEventListener("click", () => signOut());

// --- mailboxes ----------------------------------------------------------------------------

const ROLE_ORDER = ["inbox", "drafts", "sent", "archive", "junk", "trash"];

async function loadMailboxes() {
  const r = await client.call([["Mailbox/get", { ids: null }, "m"]]);
  state.seen.Mailbox = r.m.state;
  const list = r.m.list || [];
  const order = (a, b) => {
    const ra = ROLE_ORDER.indexOf(a.role), rb = ROLE_ORDER.indexOf(b.role);
    if (ra !== rb) return (ra < 0 ? 99 : ra) - (rb < 0 ? 99 : rb);
    return (a.sortOrder || 0) - (b.sortOrder || 0) || a.name.localeCompare(b.name);
  };
  // The tree, flattened: each mailbox after its parent, its depth for the indent.
  const ids = new Set(list.map((m) => m.id));
  const children = new Map();
  for (const m of list) {
    const parent = m.parentId && ids.has(m.parentId) ? m.parentId : null;
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(m);
  }
  const flat = [];
  const walk = (parent, depth) => {
    for (const m of (children.get(parent) || []).sort(order)) {
      if (flat.includes(m)) continue; // a cycle in parentIds: show each once
      m.depth = depth;
      flat.push(m);
      walk(m.id, depth + 1);
    }
  };
  walk(null, 0);
  for (const m of list) if (!flat.includes(m)) { m.depth = 0; flat.push(m); }
  state.mailboxes = flat;
  if (state.current) state.current = list.find((m) => m.id === state.current.id) || null;
  renderMailboxes();
}

// IMAP's "INBOX" reads better as "Inbox"; every other name is the user's own.
function mailboxName(mailbox) {
  return mailbox.role === "inbox" && mailbox.name.toUpperCase() === "INBOX" ? "Inbox" : mailbox.name;
}

function renderMailboxes() {
  const ul = $("mailbox-list");
  ul.replaceChildren(...state.mailboxes.map((mailbox) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "mailbox";
    button.dataset.id = mailbox.id;
    if (mailbox.depth) button.style.paddingLeft = `${0.5 + mailbox.depth}rem`;
    if (state.current && state.current.id === mailbox.id && !state.search) {
      button.setAttribute("aria-current", "true");
    }
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = mailboxName(mailbox);
    button.append(name);
    if (mailbox.unreadEmails > 0) {
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = String(mailbox.unreadEmails);
      const label = document.createElement("span");
      label.className = "visually-hidden";
      label.textContent = " unread";
      count.append(label);
      button.append(count);
    }
    button.addEventListener("click", () => guarded(() => openMailbox(mailbox)));
    li.append(button);
    return li;
  }));
}

// --- the message list ---------------------------------------------------------------------

function queryArgs() {
  const filter = state.search
    ? { text: state.search }
    : (state.current ? { inMailbox: state.current.id } : null);
  return {
    filter, sort: [{ property: "receivedAt", isAscending: false }], collapseThreads: false,
  };
}

async function openMailbox(mailbox) {
  state.current = mailbox;
  state.search = "";
  $("search-input").value = "";
  $("list-title").textContent = mailbox ? mailboxName(mailbox) : "Mail";
  renderMailboxes();
  await reloadList();
}

// Load the list again from position 0 (at least *keep* rows); the reader stays open only
// when *keepReader* (a push refresh must not pull a message from under its reader).
async function reloadList(keep = 0, keepReader = false) {
  state.ids = [];
  state.emails.clear();
  state.total = null;
  state.selected = -1;
  $("message-list").replaceChildren();
  if (!keepReader) closeReader(false);
  await loadMore(Math.min(Math.max(PAGE, keep), MAX_RELOAD));
}

// One page of Email/query by position, with Email/get of the list properties by back
// reference: one round trip per page.
async function loadMore(limit = PAGE) {
  // One page at a time per list; a reload (a new state.ids) starts over at once.
  const generation = state.ids;
  if (state.loading === generation) return;
  if (state.total !== null && state.ids.length >= state.total) return;
  state.loading = generation;
  $("list-status").textContent = "Loading…";
  let failed = false;
  try {
    const r = await client.call([
      ["Email/query", { ...queryArgs(), position: state.ids.length, limit, calculateTotal: true }, "q"],
      ["Email/get", {
        "#ids": { resultOf: "q", name: "Email/query", path: "/ids" },
        properties: LIST_PROPERTIES,
      }, "g"],
    ]);
    if (generation !== state.ids) return; // the list was reloaded meanwhile
    state.seen.Email = r.g.state;
    for (const email of r.g.list || []) state.emails.set(email.id, email);
    const known = new Set(state.ids); // a message that moved up since the last page
    const fresh = (r.q.ids || []).filter((id) => state.emails.has(id) && !known.has(id));
    state.total = typeof r.q.total === "number" ? r.q.total : null;
    if (fresh.length === 0) state.total = state.ids.length;
    const start = state.ids.length;
    state.ids.push(...fresh);
    appendRows(start);
  } catch (error) {
    failed = true;
    throw error;
  } finally {
    if (state.loading === generation) {
      state.loading = null;
      if (failed) $("list-status").textContent = "The list could not be loaded.";
      else updateListStatus();
    }
  }
  if (!failed && generation === state.ids) fillPane();
}

// The observer below fires when the sentinel comes into view, not while it stays there: a
// page that does not fill the pane asks for the next one itself.
function fillPane() {
  if (state.total === null || state.ids.length >= state.total) return;
  const end = $("list-end").getBoundingClientRect();
  const pane = $("list-pane").getBoundingClientRect();
  if (end.top <= pane.bottom && pane.height > 0) setTimeout(() => guarded(() => loadMore()), 0);
}

function updateListStatus() {
  const n = state.ids.length;
  let text;
  if (n === 0) text = state.search ? "No message matches." : "No messages.";
  else if (state.total !== null && n < state.total) text = `${n} of ${state.total} shown; scroll for more.`;
  else text = `${n} message${n === 1 ? "" : "s"}.`;
  $("list-status").textContent = text;
}

function rowFor(email, index) {
  const li = document.createElement("li");
  li.className = "row";
  li.id = `msg-${index}`;
  li.dataset.id = email.id;
  li.tabIndex = index === Math.max(state.selected, 0) ? 0 : -1;
  const keywords = email.keywords || {};
  const unread = !keywords.$seen;
  li.classList.toggle("unread", unread);
  li.classList.toggle("flagged", Boolean(keywords.$flagged));

  const from = document.createElement("span");
  from.className = "from";
  from.textContent = shortSender(email.from);
  const subject = document.createElement("span");
  subject.className = "subject";
  subject.textContent = email.subject || "(no subject)";
  const preview = document.createElement("span");
  preview.className = "preview";
  preview.textContent = email.preview || "";
  const date = document.createElement("time");
  date.className = "date";
  date.dateTime = email.receivedAt || "";
  date.textContent = listDate(email.receivedAt);
  const marks = document.createElement("span");
  marks.className = "marks";
  marks.textContent = (keywords.$flagged ? "★" : "") + (email.hasAttachment ? "📎" : "");
  const hidden = document.createElement("span");
  hidden.className = "visually-hidden";
  hidden.textContent = [unread ? "unread" : "", keywords.$flagged ? "flagged" : "",
    email.hasAttachment ? "has attachments" : ""].filter(Boolean).join(", ");
  li.append(hidden, from, subject, preview, date, marks);
  li.addEventListener("click", () => { select(index, false); guarded(() => openMessage(email.id)); });
  return li;
}

function appendRows(start) {
  const list = $("message-list");
  const rows = [];
  for (let i = start; i < state.ids.length; i += 1) rows.push(rowFor(state.emails.get(state.ids[i]), i));
  list.append(...rows);
  if (state.selected < 0 && state.ids.length > 0) state.selected = 0;
}

function replaceRow(id) {
  const index = state.ids.indexOf(id);
  if (index < 0) return;
  const old = $(`msg-${index}`);
  if (!old) return;
  const row = rowFor(state.emails.get(id), index);
  row.tabIndex = old.tabIndex;
  old.replaceWith(row);
  if (document.activeElement === document.body && index === state.selected) row.focus();
}

function select(index, focus = true) {
  if (index < 0 || index >= state.ids.length) return;
  const old = $(`msg-${state.selected}`);
  if (old) old.tabIndex = -1;
  state.selected = index;
  const row = $(`msg-${index}`);
  row.tabIndex = 0;
  if (focus) row.focus();
  row.scrollIntoView({ block: "nearest" });
  // Near the end of what is loaded: fetch the next page before the reader gets there.
  if (index >= state.ids.length - 5) guarded(() => loadMore());
}

// Infinite scroll: the sentinel below the list coming into view loads the next page.
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting) && client.signedIn && state.ids.length > 0) {
    guarded(() => loadMore());
  }
}).observe($("list-end"));

// --- the reader ---------------------------------------------------------------------------

async function openMessage(id) {
  const r = await client.call([["Email/get", {
    ids: [id], properties: READ_PROPERTIES, fetchTextBodyValues: true,
    fetchHTMLBodyValues: true, maxBodyValueBytes: 1048576,
  }, "r"]]);
  const email = (r.r.list || [])[0];
  if (!email) { status("That message is gone."); return; }
  const html = bodyPart(email.htmlBody, "text/html", email.bodyValues || {});
  state.openHtml = html ? await inlineCidImages(html.value,
    [...(email.htmlBody || []), ...(email.attachments || [])],
    (part) => client.download(part.blobId, part.name || "image", part.type)) : null;
  state.open = email;
  state.allowImages = false;
  renderReader();
  $("reader").hidden = false;
  $("list-pane").classList.add("behind");
  $("reader-subject").focus();
  if (!(email.keywords || {}).$seen) await setKeyword(email, "$seen", true);
}

function bodyPart(parts, type, values) {
  for (const part of parts || []) {
    if (part.type === type && values[part.partId]) return values[part.partId];
  }
  return null;
}

function renderReader() {
  const email = state.open;
  $("reader-subject").textContent = email.subject || "(no subject)";
  const dl = $("reader-headers");
  dl.replaceChildren();
  for (const [label, value] of [["From", formatAddresses(email.from)], ["To", formatAddresses(email.to)],
    ["Cc", formatAddresses(email.cc)],
    ["Date", email.sentAt || email.receivedAt ? fullFormat.format(new Date(email.sentAt || email.receivedAt)) : ""]]) {
    if (!value) continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }
  const flagged = Boolean((email.keywords || {}).$flagged);
  $("flag-button").setAttribute("aria-pressed", String(flagged));
  $("flag-button").textContent = flagged ? "Unflag" : "Flag";

  const values = email.bodyValues || {};
  const html = bodyPart(email.htmlBody, "text/html", values);
  const text = bodyPart(email.textBody, "text/plain", values);
  const body = $("reader-body");
  const images = $("images-button");
  if (html) {
    body.replaceChildren(htmlFrame(state.openHtml ?? html.value, state.allowImages));
    images.hidden = state.allowImages || !hasRemoteContent(html.value);
  } else {
    body.replaceChildren(textBlock(text ? text.value : ""));
    images.hidden = true;
  }
  if ((html || text) && (html || text).isTruncated) {
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = "This message is long; only its beginning is shown.";
    body.append(note);
  }
  const attachments = email.attachments || [];
  $("reader-attachments").hidden = attachments.length === 0;
  $("attachment-list").replaceChildren(...attachments.map((part) => {
    const li = document.createElement("li");
    const link = document.createElement("a");
    const name = part.name || "attachment";
    link.href = client.downloadUrl(part.blobId, name, part.type);
    link.download = name;
    link.textContent = `${name} (${part.type || "unknown type"}, ${formatSize(part.size)})`;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      guarded(() => saveBlob(part.blobId, name, part.type));
    });
    li.append(link);
    return li;
  }));
}

function formatSize(size) {
  if (typeof size !== "number") return "size unknown";
  if (size < 1024) return `${size} bytes`;
  if (size < 1048576) return `${(size / 1024).toFixed(1)} KiB`;
  return `${(size / 1048576).toFixed(1)} MiB`;
}

// The download endpoint wants the bearer token, which a plain link cannot send: fetch the
// blob, then hand it to the browser as a download.
async function saveBlob(blobId, name, type) {
  const blob = await client.download(blobId, name, type);
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function closeReader(focusList = true) {
  state.open = null;
  $("reader").hidden = true;
  // nothing of the closed message stays behind for the next open to be mistaken for
  $("reader-subject").textContent = "";
  $("reader-headers").replaceChildren();
  $("reader-body").replaceChildren();
  $("list-pane").classList.remove("behind");
  if (focusList) {
    const row = $(`msg-${state.selected}`);
    (row || $("message-list")).focus();
  }
}

$("back-button").addEventListener("click", () => closeReader());
$("images-button").addEventListener("click", () => {
  state.allowImages = true;
  renderReader();
  $("reader-body").querySelector("iframe")?.focus();
});

// --- keywords and moves -------------------------------------------------------------------

async function setKeyword(email, keyword, on) {
  await client.call([["Email/set", { update: { [email.id]: { [`keywords/${keyword}`]: on || null } } }, "k"]]);
  email.keywords = { ...(email.keywords || {}) };
  if (on) email.keywords[keyword] = true; else delete email.keywords[keyword];
  const listed = state.emails.get(email.id);
  if (listed && listed !== email) listed.keywords = { ...email.keywords };
  replaceRow(email.id);
  if (keyword === "$seen") await loadMailboxes();
}

function targetEmail() {
  if (state.open) return state.open;
  const id = state.ids[state.selected];
  return id ? state.emails.get(id) : null;
}

async function toggleFlag() {
  const email = targetEmail();
  if (!email) return;
  const on = !(email.keywords || {}).$flagged;
  await setKeyword(email, "$flagged", on);
  if (state.open === email) renderReader();
  status(on ? "Flagged." : "Flag removed.");
}

async function markUnread() {
  const email = targetEmail();
  if (!email) return;
  await setKeyword(email, "$seen", false);
  if (state.open === email) closeReader();
  status("Marked unread.");
}

async function moveToTrash() {
  const email = targetEmail();
  if (!email) return;
  const trash = mailboxByRole("trash");
  if (!trash) { status("There is no Trash mailbox."); return; }
  if (email.mailboxIds && email.mailboxIds[trash.id]) {
    status("The message is already in the Trash.");
    return;
  }
  const r = await client.call([["Email/set", { update: { [email.id]: { mailboxIds: { [trash.id]: true } } } }, "t"]]);
  const failed = (r.t.notUpdated || {})[email.id];
  if (failed) throw new Error(failed.description || failed.type);
  const index = state.ids.indexOf(email.id);
  closeReader(false);
  await loadMailboxes();
  await reloadList(state.ids.length);
  select(Math.min(index, state.ids.length - 1));
  status("Moved to Trash.");
}

$("flag-button").addEventListener("click", () => guarded(toggleFlag));
$("unread-button").addEventListener("click", () => guarded(markUnread));
$("trash-button").addEventListener("click", () => guarded(moveToTrash));

// --- search -------------------------------------------------------------------------------

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("search-input").value.trim();
  guarded(async () => {
    if (!text) { await openMailbox(state.current || mailboxByRole("inbox")); return; }
    state.search = text;
    $("list-title").textContent = `Search: ${text}`;
    renderMailboxes();
    await reloadList();
    $("message-list").focus();
  });
});

// --- compose, reply, forward --------------------------------------------------------------

let composeReturn = null;
let composeContext = {};

function openCompose({ to = "", cc = "", subject = "", body = "", attachments = [], context = {} } = {}) {
  composeReturn = document.activeElement;
  composeContext = context;
  state.attachments = attachments.slice();
  const form = $("compose-form");
  form.elements.to.value = to;
  form.elements.cc.value = cc;
  form.elements.subject.value = subject;
  form.elements.body.value = body;
  form.elements.files.value = "";
  $("compose-error").textContent = "";
  $("compose-title").textContent = context.kind === "reply" ? "Reply"
    : context.kind === "forward" ? "Forward" : "New message";
  renderComposeAttachments();
  $("compose").showModal();
  const first = to ? form.elements.body : form.elements.to;
  first.focus();
  if (to) first.setSelectionRange(0, 0);
}

function closeCompose() {
  $("compose").close();
}

$("compose").addEventListener("close", () => {
  if (composeReturn && document.contains(composeReturn)) composeReturn.focus();
  composeReturn = null;
});

function renderComposeAttachments() {
  $("compose-attachments").replaceChildren(...state.attachments.map((att, i) => {
    const li = document.createElement("li");
    li.textContent = `${att.name} (${formatSize(att.size)}) `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${att.name}`);
    remove.addEventListener("click", () => {
      state.attachments.splice(i, 1);
      renderComposeAttachments();
      $("compose-files").focus();
    });
    li.append(remove);
    return li;
  }));
}

$("compose-files").addEventListener("change", (event) => {
  const files = Array.from(event.target.files || []);
  event.target.value = "";
  guarded(async () => {
    for (const file of files) {
      status(`Uploading ${file.name}…`);
      const blob = await client.upload(file);
      state.attachments.push({ blobId: blob.blobId, type: file.type || blob.type || "application/octet-stream", name: file.name, size: file.size });
      renderComposeAttachments();
    }
    status(files.length ? "Attached." : "");
  });
});

$("cancel-button").addEventListener("click", closeCompose);
$("compose-button").addEventListener("click", () => openCompose());

// The message's text for a reply or forward: its plain text, else its HTML as text.
function plainText(email) {
  const values = email.bodyValues || {};
  const text = bodyPart(email.textBody, "text/plain", values);
  if (text) return text.value;
  const html = bodyPart(email.htmlBody, "text/html", values) || bodyPart(email.textBody, "text/html", values);
  return html ? htmlToText(html.value) : (email.preview || "");
}

function quote(email) {
  return plainText(email).replace(/\r\n/g, "\n").split("\n").map((line) => `> ${line}`).join("\n");
}

function withPrefix(prefix, subject) {
  const s = subject || "";
  return new RegExp(`^${prefix}:`, "i").test(s) ? s : `${prefix}: ${s}`;
}

function myEmail() {
  return (state.identity && state.identity.email) || (client.session && client.session.username) || "";
}

function reply(all) {
  const email = state.open;
  if (!email) return;
  const to = (email.replyTo && email.replyTo.length ? email.replyTo : email.from) || [];
  const me = myEmail().toLowerCase();
  const cc = all
    ? [...(email.to || []), ...(email.cc || [])].filter((a) => a.email.toLowerCase() !== me
      && !to.some((t) => t.email.toLowerCase() === a.email.toLowerCase()))
    : [];
  const when = fullFormat.format(new Date(email.sentAt || email.receivedAt));
  const references = [...(email.references || []), ...(email.messageId || [])];
  openCompose({
    to: formatAddresses(to), cc: formatAddresses(cc),
    subject: withPrefix("Re", email.subject),
    body: `\n\nOn ${when}, ${formatAddress((email.from || [])[0])} wrote:\n${quote(email)}\n`,
    context: { kind: "reply", inReplyTo: email.messageId || null, references, answered: email.id },
  });
}

function forward() {
  const email = state.open;
  if (!email) return;
  const header = [
    "---------- Forwarded message ----------",
    `From: ${formatAddresses(email.from)}`,
    `Date: ${fullFormat.format(new Date(email.sentAt || email.receivedAt))}`,
    `Subject: ${email.subject || ""}`,
    `To: ${formatAddresses(email.to)}`,
  ].join("\n");
  openCompose({
    subject: withPrefix("Fwd", email.subject),
    body: `\n\n${header}\n\n${plainText(email)}\n`,
    attachments: (email.attachments || []).map((p) => ({
      blobId: p.blobId, type: p.type, name: p.name || "attachment", size: p.size })),
    context: { kind: "forward", forwarded: email.id },
  });
}

$("reply-button").addEventListener("click", () => reply(false));
$("reply-all-button").addEventListener("click", () => reply(true));
$("forward-button").addEventListener("click", forward);

async function loadIdentity() {
  if (state.identity) return state.identity;
  const r = await client.call([["Identity/get", { ids: null }, "i"]]);
  const list = r.i.list || [];
  state.identity = list[0] || null;
  if (!state.identity) throw new Error("the server has no sending identity for this account");
  return state.identity;
}

// Email/set creates the message in Drafts; EmailSubmission/set sends it (the server's
// submission path: DKIM, queue, DSNs) and, on success, files it in Sent.
async function send(form) {
  const to = parseAddresses(form.elements.to.value);
  const cc = parseAddresses(form.elements.cc.value);
  if (to.length + cc.length === 0) throw new Error("Say whom to send it to.");
  const identity = await loadIdentity();
  const drafts = mailboxByRole("drafts");
  const sent = mailboxByRole("sent");
  const home = drafts || sent || mailboxByRole("inbox") || state.mailboxes[0];
  if (!home) throw new Error("there is no mailbox to keep the message in");
  const draft = {
    mailboxIds: { [home.id]: true },
    keywords: { $draft: true, $seen: true },
    from: [identity.name ? { name: identity.name, email: identity.email } : { email: identity.email }],
    to,
    subject: form.elements.subject.value,
    bodyValues: { body: { value: form.elements.body.value } },
    textBody: [{ partId: "body", type: "text/plain" }],
  };
  if (cc.length) draft.cc = cc;
  if (composeContext.inReplyTo) {
    draft.inReplyTo = composeContext.inReplyTo;
    draft.references = composeContext.references;
  }
  if (state.attachments.length) {
    draft.attachments = state.attachments.map((a) => ({
      blobId: a.blobId, type: a.type, name: a.name, disposition: "attachment" }));
  }
  const onSuccess = { "keywords/$draft": null };
  if (drafts && sent) {
    onSuccess[`mailboxIds/${drafts.id}`] = null;
    onSuccess[`mailboxIds/${sent.id}`] = true;
  }
  // Two requests: the draft first, then its submission by the id the server gave it. (One
  // request with "emailId": "#draft" would do, RFC 8620 §5.3; this way a server that does
  // not resolve creation ids in EmailSubmission/set works as well, and a failed send
  // leaves the message in Drafts.)
  const make = { create: { draft } };
  if (composeContext.draftId) make.destroy = [composeContext.draftId]; // a retry replaces it
  const made = await client.call([["Email/set", make, "c"]]);
  const notCreated = (made.c.notCreated || {}).draft;
  if (notCreated) throw new Error(`the message was refused: ${setError(notCreated)}`);
  const emailId = made.c.created.draft.id;
  composeContext.draftId = emailId;
  const calls = [
    ["EmailSubmission/set", {
      create: { send: { identityId: identity.id, emailId } },
      onSuccessUpdateEmail: { "#send": onSuccess },
    }, "s"],
  ];
  if (composeContext.answered) {
    calls.push(["Email/set", { update: { [composeContext.answered]: { "keywords/$answered": true } } }, "a"]);
  }
  if (composeContext.forwarded) {
    calls.push(["Email/set", { update: { [composeContext.forwarded]: { "keywords/$forwarded": true } } }, "f"]);
  }
  const r = await client.call(calls);
  const notSent = (r.s.notCreated || {}).send;
  if (notSent) throw new Error(`sending failed: ${setError(notSent)}; the message is in Drafts`);
}

// A SetError for a person: its description, or its type and the properties it names.
function setError(error) {
  if (error.description) return error.description;
  return error.type + (error.properties ? ` (${error.properties.join(", ")})` : "");
}

$("compose-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const button = $("send-button");
  button.disabled = true;
  $("compose-error").textContent = "";
  send(form).then(() => {
    closeCompose();
    status("Message sent.");
    return guarded(loadMailboxes);
  }).catch((error) => {
    if (error instanceof JmapError && error.status === 401) { closeCompose(); signOut("Your session has ended."); return; }
    $("compose-error").textContent = error.message;
  }).finally(() => { button.disabled = false; });
});

// --- push ---------------------------------------------------------------------------------

// A StateChange for this account: refresh the counts and the list (once per burst).
function onPush(changed) {
  const mine = changed[client.accountId];
  if (!mine) return;
  // The event sent at connection (and any other) names states we may already show.
  if (["Email", "Mailbox"].every((type) => !(type in mine) || mine[type] === state.seen[type])) return;
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => guarded(refresh), 150);
}

// EventSource reconnects by itself after a network error; it gives up (CLOSED) on an HTTP
// error such as a 401. Then check the session after a while: sign out if the token is no
// longer good, else open the channel again and catch up.
function onPushTrouble(readyState) {
  if (readyState !== EventSource.CLOSED) return;
  setTimeout(() => guarded(async () => {
    if (!client.signedIn) return;
    await client.fetchSession();
    client.openEvents(onPush, onPushTrouble);
    await refresh();
  }), 10000);
}

async function refresh() {
  await loadMailboxes();
  const selectedId = state.ids[state.selected];
  const hadFocus = $("message-list").contains(document.activeElement);
  await reloadList(state.ids.length, true);
  const index = Math.max(0, state.ids.indexOf(selectedId));
  if (state.ids.length) select(index, hadFocus);
}

// --- keyboard -----------------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  if ($("mail-view").hidden || $("compose").open) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) {
    if (event.key === "Escape") target.blur();
    return;
  }
  const inList = $("message-list").contains(target) || target === $("message-list") || target === document.body;
  const key = event.key;
  let handled = true;
  if ((key === "j" || key === "ArrowDown") && inList) select(Math.max(0, state.selected) + (state.selected < 0 ? 0 : 1));
  else if ((key === "k" || key === "ArrowUp") && inList) select(Math.max(0, state.selected - 1));
  else if (key === "Home" && inList) select(0);
  else if (key === "End" && inList) select(state.ids.length - 1);
  else if (key === "Enter" && inList && state.selected >= 0) guarded(() => openMessage(state.ids[state.selected]));
  else if (key === "Escape" && state.open) closeReader();
  else if (key === "c") openCompose();
  else if (key === "r" && state.open) reply(false);
  else if (key === "a" && state.open) reply(true);
  else if (key === "f" && state.open) forward();
  else if (key === "s") guarded(toggleFlag);
  else if (key === "u") guarded(markUnread);
  else if (key === "#" || key === "Delete") guarded(moveToTrash);
  else if (key === "/") $("search-input").focus();
  else handled = false;
  if (handled) event.preventDefault();
});

// The list itself takes focus (Tab into it) and hands it to the selected row.
$("message-list").tabIndex = -1;
$("message-list").addEventListener("focus", () => {
  const row = $(`msg-${Math.max(state.selected, 0)}`);
  if (row) row.focus();
});

start();
