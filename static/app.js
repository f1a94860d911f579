/* Image search web UI: plain JavaScript over the HTTP API (POST /search, POST /explain, GET /thumbnails/<id>,
   GET /images/<id>, GET /). */
"use strict";

(() => {
  const DEFAULT_API = "http://localhost:8000";
  const DEFAULT_TOP_K = 20;
  const MAX_TOP_K = 200;
  const REQUEST_TIMEOUT_MS = 120000;
  // Results whose tiny preview comes inline in the answer: about the first row or two of photos.
  const PREVIEWS = 8;
  const STORAGE = {
    base: "imageSearch.apiBase",
    tokens: "imageSearch.tokens",
    legacyToken: "imageSearch.token",
    image: "imageSearch.queryImage",
  };
  const HIDDEN_FACTS = new Set(["path", "name", "description", "content_hash", "indexed", "tags", "photo_metadata"]);
  const MODES = ["vector", "keyword", "hybrid"];
  const EXPLAIN_GRID = 6;
  const SORTS = ["relevance", "taken", "-taken"];
  const PHOTO_FACTS = ["taken", "taken_offset", "camera", "lens", "focal_length", "iso", "exposure"];
  const PLACE_FACTS = ["latitude", "longitude", "place", "region", "country", "country_code"];
  const DATE = /^\d{4}-\d{2}-\d{2}$/;

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("search-form"),
    query: $("query"),
    fileInput: $("file-input"),
    imageButton: $("image-button"),
    filtersButton: $("filters-button"),
    controls: $("controls"),
    topbar: document.querySelector(".topbar"),
    modeSwitch: document.querySelector(".mode-switch"),
    resultsTitle: $("results-title"),
    topK: $("top-k"),
    minScore: $("min-score"),
    tag: $("tag-filter"),
    folder: $("folder-filter"),
    rawFilter: $("raw-filter"),
    sort: $("sort"),
    takenFrom: $("taken-from"),
    takenTo: $("taken-to"),
    advanced: $("advanced"),
    knownTags: $("known-tags"),
    knownFolders: $("known-folders"),
    chips: $("query-chips"),
    status: $("status"),
    results: $("results"),
    grid: $("grid"),
    pager: $("pager"),
    prevPage: $("prev-page"),
    nextPage: $("next-page"),
    pageInfo: $("page-info"),
    apiStatus: $("api-status"),
    dropOverlay: $("drop-overlay"),
    preview: $("preview"),
    previewImage: $("preview-image"),
    heatOverlay: $("heat-overlay"),
    heatToggle: $("heat-toggle"),
    heatStatus: $("heat-status"),
    detailsToggle: $("details-toggle"),
    previewDetails: $("preview-details"),
    engineFacts: $("engine-facts"),
    previewDuplicates: $("preview-duplicates"),
    duplicatesStrip: $("duplicates-strip"),
    previewTitle: $("preview-title"),
    previewPosition: $("preview-position"),
    previewDescription: $("preview-description"),
    previewFacts: $("preview-facts"),
    previewWhy: $("preview-why"),
    previewPrev: $("preview-prev"),
    previewNext: $("preview-next"),
    previewClose: $("preview-close"),
    moreLikeThis: $("more-like-this"),
    openOriginal: $("open-original"),
    settings: $("settings"),
    settingsButton: $("settings-button"),
    settingsForm: $("settings-form"),
    settingsResult: $("settings-result"),
    settingsTest: $("settings-test"),
    settingsCancel: $("settings-cancel"),
    apiBaseInput: $("api-base"),
    apiTokenInput: $("api-token"),
  };

  /** Everything that defines the current search; mirrored in the URL. */
  const state = {
    query: "",
    image: null,
    imageName: "",
    similarTo: null,
    similarName: "",
    mode: "vector",
    topK: DEFAULT_TOP_K,
    minScore: null,
    tag: "",
    folder: "",
    rawFilter: "",
    sort: "relevance",
    takenFrom: "",
    takenTo: "",
    page: 1,
  };

  const view = {
    results: [],
    hasMore: false,
    current: -1,
    serial: 0,
    controller: null,
    fullImageUrl: null,
    prefetched: null,
    heat: new Map(),
    heatController: null,
  };
  const known = { tags: new Set(), folders: new Set() };
  let maxTopK = MAX_TOP_K;
  let dragDepth = 0;
  let lastFocus = null;

  // ---- storage and API address -------------------------------------------------------------------

  function stored(key) {
    try {
      return window.localStorage.getItem(key) || "";
    } catch {
      return "";
    }
  }

  function store(key, value) {
    try {
      if (value) window.localStorage.setItem(key, value);
      else window.localStorage.removeItem(key);
    } catch {
      /* storage can be disabled (private mode, file:// policies); settings then last for the visit */
    }
  }

  function trimBase(url) {
    return url.trim().replace(/\/+$/, "");
  }

  /** The page's own origin when the API serves it, else the documented default. */
  function defaultApiBase() {
    const { protocol, origin } = window.location;
    return protocol === "http:" || protocol === "https:" ? origin : DEFAULT_API;
  }

  function urlApiParam() {
    return new URLSearchParams(window.location.search).get("api") || "";
  }

  function apiBase() {
    return trimBase(urlApiParam() || stored(STORAGE.base) || defaultApiBase());
  }

  function apiUrl(path) {
    if (/^https?:\/\//i.test(path)) return path;
    return apiBase() + (path.startsWith("/") ? path : `/${path}`);
  }

  // A token is kept per API address and sent only to the address it was given for (in Settings, or
  // by the link the server prints): an ?api= address from a link never receives another one's token.

  function savedTokens() {
    try {
      const tokens = JSON.parse(stored(STORAGE.tokens) || "{}");
      return tokens && typeof tokens === "object" && !Array.isArray(tokens) ? tokens : {};
    } catch {
      return {};
    }
  }

  function tokenFor(base) {
    const token = savedTokens()[trimBase(base)];
    return typeof token === "string" ? token : "";
  }

  function saveToken(base, token) {
    const tokens = savedTokens();
    if (token) tokens[trimBase(base)] = token;
    else delete tokens[trimBase(base)];
    store(STORAGE.tokens, Object.keys(tokens).length ? JSON.stringify(tokens) : "");
  }

  /** A token saved before tokens were kept per address belongs to the address saved with it. */
  function adoptLegacyToken() {
    const token = stored(STORAGE.legacyToken);
    if (!token) return;
    if (!tokenFor(stored(STORAGE.base) || defaultApiBase())) saveToken(stored(STORAGE.base) || defaultApiBase(), token);
    store(STORAGE.legacyToken, "");
  }

  /** The connect link printed by `python api.py` carries the token in its #fragment (never sent to a server). */
  function takeTokenFromLink() {
    const fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const token = (fragment.get("token") || "").trim();
    if (!token) return;
    saveToken(apiBase(), token);
    try {
      window.history.replaceState(null, "", `${window.location.pathname}${window.location.search}`);
    } catch {
      /* history unavailable: the token stays visible in the address bar */
    }
  }

  function authHeaders() {
    const token = tokenFor(apiBase());
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  class ApiError extends Error {
    constructor(kind, message, status = 0) {
      super(message);
      this.kind = kind;
      this.status = status;
    }
  }

  /** fetch() against the API, turning every failure into an ApiError with a readable message. */
  async function apiFetch(path, options = {}, signal = undefined) {
    const url = apiUrl(path);
    let response;
    try {
      response = await fetch(url, { ...options, signal, headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("unreachable", `Cannot reach the image search API at ${apiBase()}.`);
    }
    if (!response.ok) throw new ApiError("http", await errorMessage(response), response.status);
    return response;
  }

  async function errorMessage(response) {
    let message = "";
    try {
      const body = await response.json();
      message = body && (body.error || body.message);
    } catch {
      /* not JSON: fall back to the status line */
    }
    if (response.status === 401) {
      message =
        `The API at ${apiBase()} needs its access token: open the link that \`python api.py\` printed, ` +
        "or paste the token into Settings.";
    }
    return message || `The API answered ${response.status} ${response.statusText}`.trim();
  }

  // ---- state <-> URL -----------------------------------------------------------------------------

  function clampTopK(value) {
    const number = Math.round(Number(value));
    if (String(value).trim() === "" || !Number.isFinite(number)) return DEFAULT_TOP_K;
    return Math.max(1, Math.min(number, maxTopK));
  }

  function parseMinScore(value) {
    if (value === null || value === undefined || String(value).trim() === "") return null;
    const number = Number(value);
    return Number.isFinite(number) ? Math.max(-1, Math.min(1, number)) : null;
  }

  function readStateFromUrl() {
    const params = new URLSearchParams(window.location.search);
    state.query = params.get("q") || "";
    state.mode = MODES.includes(params.get("mode")) ? params.get("mode") : "vector";
    state.topK = params.has("top_k") ? clampTopK(params.get("top_k")) : DEFAULT_TOP_K;
    state.minScore = parseMinScore(params.get("min_score"));
    state.tag = params.get("tag") || "";
    state.folder = params.get("folder") || "";
    state.rawFilter = params.get("filters") || "";
    state.sort = SORTS.includes(params.get("sort")) ? params.get("sort") : "relevance";
    state.takenFrom = DATE.test(params.get("taken_from") || "") ? params.get("taken_from") : "";
    state.takenTo = DATE.test(params.get("taken_to") || "") ? params.get("taken_to") : "";
    state.page = Math.max(1, Math.round(Number(params.get("page"))) || 1);
    state.similarTo = params.get("similar_to") || null;
    state.similarName = params.get("similar_name") || "";
    state.image = null;
    state.imageName = "";
    if (params.get("image") === "1") restoreQueryImage();
  }

  function stateParams() {
    const params = new URLSearchParams();
    const api = urlApiParam();
    if (api) params.set("api", api);
    if (state.query) params.set("q", state.query);
    if (state.similarTo) {
      params.set("similar_to", state.similarTo);
      if (state.similarName) params.set("similar_name", state.similarName);
    }
    if (state.image) params.set("image", "1");
    if (state.mode !== "vector") params.set("mode", state.mode);
    if (state.topK !== DEFAULT_TOP_K) params.set("top_k", String(state.topK));
    if (state.minScore !== null) params.set("min_score", String(state.minScore));
    if (state.tag) params.set("tag", state.tag);
    if (state.folder) params.set("folder", state.folder);
    if (state.rawFilter) params.set("filters", state.rawFilter);
    if (state.sort !== "relevance") params.set("sort", state.sort);
    if (state.takenFrom) params.set("taken_from", state.takenFrom);
    if (state.takenTo) params.set("taken_to", state.takenTo);
    if (state.page > 1) params.set("page", String(state.page));
    return params;
  }

  function writeStateToUrl(push) {
    const search = stateParams().toString();
    const url = `${window.location.pathname}${search ? `?${search}` : ""}`;
    if (url === `${window.location.pathname}${window.location.search}`) return;
    try {
      if (push) window.history.pushState(null, "", url);
      else window.history.replaceState(null, "", url);
    } catch {
      /* some file:// setups refuse history changes; the search still runs */
    }
  }

  function rememberQueryImage() {
    try {
      window.sessionStorage.setItem(STORAGE.image, JSON.stringify({ data: state.image, name: state.imageName }));
    } catch {
      /* too large for session storage: a reload then cannot repeat this image search */
    }
  }

  function restoreQueryImage() {
    try {
      const saved = JSON.parse(window.sessionStorage.getItem(STORAGE.image) || "null");
      if (saved && saved.data) {
        state.image = saved.data;
        state.imageName = saved.name || "image";
      }
    } catch {
      state.image = null;
    }
  }

  function stateToControls() {
    el.query.value = state.query;
    showModeSwitch(state.mode);
    el.topK.value = String(state.topK);
    el.minScore.value = state.minScore === null ? "" : String(state.minScore);
    el.tag.value = state.tag;
    el.folder.value = state.folder;
    el.rawFilter.value = state.rawFilter;
    el.sort.value = state.sort;
    el.takenFrom.value = state.takenFrom;
    el.takenTo.value = state.takenTo;
    if (state.rawFilter) el.advanced.open = true;
  }

  function controlsToState() {
    const checked = document.querySelector('input[name="mode"]:checked');
    /* While the switch shows the mode that ranked a query without words, the user's choice is kept. */
    if (!el.modeSwitch.dataset.ranked) state.mode = checked ? checked.value : "vector";
    state.topK = clampTopK(el.topK.value);
    el.topK.value = String(state.topK);
    state.minScore = parseMinScore(el.minScore.value);
    state.tag = el.tag.value.trim();
    state.folder = el.folder.value.trim().replace(/^\/+/, "");
    state.rawFilter = el.rawFilter.value.trim();
    state.sort = SORTS.includes(el.sort.value) ? el.sort.value : "relevance";
    state.takenFrom = DATE.test(el.takenFrom.value) ? el.takenFrom.value : "";
    state.takenTo = DATE.test(el.takenTo.value) ? el.takenTo.value : "";
  }

  // ---- the query ---------------------------------------------------------------------------------

  /** A filter value in the text syntax of filters.py, quoted when it is not a plain word. */
  function filterValue(value) {
    return /^[\w.\-/]+$/.test(value) ? value : `"${value.replace(/(["\\$`])/g, "\\$1")}"`;
  }

  function filterText() {
    const clauses = [];
    if (state.rawFilter) clauses.push(state.rawFilter);
    if (state.tag) clauses.push(`tags contains ${filterValue(state.tag)}`);
    if (state.folder) clauses.push(`folder prefix ${filterValue(state.folder)}`);
    if (state.takenFrom) clauses.push(`taken >= ${state.takenFrom}`);
    if (state.takenTo) clauses.push(`taken < ${nextDay(state.takenTo)}`);
    return clauses.join(" and ");
  }

  /** The day after a YYYY-MM-DD date: "taken until" includes the whole of its last day. */
  function nextDay(date) {
    const day = new Date(`${date}T00:00:00Z`);
    day.setUTCDate(day.getUTCDate() + 1);
    return day.toISOString().slice(0, 10);
  }

  function hasQuery() {
    return Boolean(state.query || state.image || state.similarTo);
  }

  /**
   * Thumbnails come by URL (browser-cached) when the page is the API's own /ui page. An <img> cannot send
   * a Bearer token, and another origin's <img> request may be refused, so then they come inline.
   */
  function inlineImages() {
    return Boolean(tokenFor(apiBase())) || apiOrigin() !== window.location.origin;
  }

  function apiOrigin() {
    try {
      return new URL(apiBase()).origin;
    } catch {
      return "";
    }
  }

  function requestBody(page = state.page) {
    const body = {
      top_k: state.topK,
      offset: (page - 1) * state.topK,
      mode: state.mode,
      include_images: inlineImages() ? "thumbnail" : "none",
    };
    // The first photos come inline as tiny previews, painted before their thumbnails arrive.
    if (!inlineImages()) body.previews = PREVIEWS;
    if (state.query) body.query = state.query;
    if (state.image) body.image = state.image;
    if (state.similarTo) body.similar_to = state.similarTo;
    if (state.minScore !== null) body.min_score = state.minScore;
    if (state.sort !== "relevance") body.sort = state.sort;
    const filters = filterText();
    if (filters) body.filters = filters;
    return body;
  }

  function postSearch(body, signal) {
    return apiFetch(
      "/search",
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) },
      signal,
    ).then((response) => response.json());
  }

  /** The next page's answer, asked for while the user looks at this one, so that Next costs nothing. */
  function prefetchNextPage() {
    if (!view.hasMore) return;
    const body = JSON.stringify(requestBody(state.page + 1));
    if (view.prefetched && view.prefetched.body === body) return;
    const answer = postSearch(JSON.parse(body));
    answer.catch(() => {
      if (view.prefetched && view.prefetched.answer === answer) view.prefetched = null;
    });
    view.prefetched = { body, answer };
  }

  function takePrefetched(body) {
    const prefetched = view.prefetched;
    view.prefetched = null;
    return prefetched && prefetched.body === JSON.stringify(body) ? prefetched.answer : null;
  }

  async function runSearch({ push = true } = {}) {
    renderChips();
    writeStateToUrl(push);
    if (!hasQuery()) {
      clearResults();
      showWelcome();
      return;
    }
    if (view.controller) view.controller.abort();
    const controller = new AbortController();
    const serial = ++view.serial;
    const timer = window.setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    view.controller = controller;
    const body = requestBody();
    const prefetched = takePrefetched(body);
    setLoading(true);
    try {
      const data = await (prefetched || postSearch(body, controller.signal)).catch((error) => {
        if (prefetched && error.name !== "AbortError") return postSearch(body, controller.signal);
        throw error;
      });
      if (serial !== view.serial) return;
      showResults(data);
      window.setTimeout(prefetchNextPage, 300);
    } catch (error) {
      if (serial !== view.serial) return;
      if (error.name === "AbortError") showError("timeout", "The search took too long and was stopped. Try again.");
      else showSearchError(error);
    } finally {
      window.clearTimeout(timer);
      if (serial === view.serial) {
        setLoading(false);
        view.controller = null;
      }
    }
  }

  function startNewSearch(changes) {
    Object.assign(state, { image: null, imageName: "", similarTo: null, similarName: "" }, changes, { page: 1 });
    runSearch({ push: true });
  }

  function submitSearch(event) {
    event.preventDefault();
    controlsToState();
    const text = el.query.value.trim();
    if (!text && (state.image || state.similarTo)) {
      state.page = 1;
      runSearch({ push: true });
      return;
    }
    if (!text) {
      showError("input", "Type what you are looking for, or drop an image on the page.");
      el.query.focus();
      return;
    }
    startNewSearch({ query: text });
  }

  function optionsChanged() {
    controlsToState();
    state.page = 1;
    if (hasQuery()) runSearch({ push: false });
    else writeStateToUrl(false);
  }

  /** The new page starts at the top of the view, below the sticky header (scroll-margin in style.css). */
  function goToPage(page) {
    state.page = Math.max(1, page);
    runSearch({ push: true }).then(() => {
      el.status.scrollIntoView({ block: "start" });
      el.results.focus({ preventScroll: true });
    });
  }

  // ---- image queries -----------------------------------------------------------------------------

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function searchWithFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError("input", `“${file.name}” is not an image. Drop or choose a JPEG, PNG, WebP or GIF file.`);
      return;
    }
    let data;
    try {
      data = await readAsDataUrl(file);
    } catch {
      showError("input", `Could not read “${file.name || "the image"}”.`);
      return;
    }
    controlsToState();
    el.query.value = "";
    startNewSearch({ query: "", image: data, imageName: file.name || "pasted image" });
    rememberQueryImage();
  }

  function imageFileFrom(dataTransfer) {
    if (!dataTransfer) return null;
    for (const file of dataTransfer.files || []) if (file.type.startsWith("image/")) return file;
    for (const item of dataTransfer.items || []) {
      if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
    }
    return dataTransfer.files && dataTransfer.files.length ? dataTransfer.files[0] : null;
  }

  function carriesFiles(event) {
    return Boolean(event.dataTransfer) && Array.from(event.dataTransfer.types || []).includes("Files");
  }

  function showDropOverlay(visible) {
    el.dropOverlay.hidden = !visible;
    document.body.classList.toggle("dragging", visible);
  }

  function onDragEnter(event) {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    showDropOverlay(true);
  }

  function onDragOver(event) {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  }

  function onDragLeave(event) {
    if (!carriesFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) showDropOverlay(false);
  }

  function onDrop(event) {
    event.preventDefault();
    dragDepth = 0;
    showDropOverlay(false);
    const file = imageFileFrom(event.dataTransfer);
    if (file) searchWithFile(file);
    else showError("input", "Drop an image file to search by example.");
  }

  function onPaste(event) {
    const file = imageFileFrom(event.clipboardData);
    if (!file || !file.type.startsWith("image/")) return;
    event.preventDefault();
    searchWithFile(file);
  }

  // ---- rendering: status, chips, results -----------------------------------------------------------

  function node(tag, attributes = {}, ...children) {
    const element = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") element.className = value;
      else if (key === "text") element.textContent = value;
      else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
      else element.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) {
        element.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return element;
  }

  function setStatus(kind, ...content) {
    el.status.dataset.kind = kind;
    el.status.setAttribute("role", kind === "error" || kind === "unreachable" ? "alert" : "status");
    el.status.replaceChildren(...content);
  }

  function setLoading(loading) {
    document.body.classList.toggle("is-loading", loading);
    el.results.setAttribute("aria-busy", loading ? "true" : "false");
    if (loading) {
      setStatus("loading", node("span", { class: "spinner", "aria-hidden": "true" }), node("span", { text: "Searching…" }));
    }
  }

  function showWelcome() {
    el.resultsTitle.hidden = true;
    setStatus(
      "welcome",
      node(
        "div",
        { class: "welcome" },
        node("h1", { text: "Find images by what they show" }),
        node("p", {
          text: "Describe a scene in words, or drop, paste or choose an image to find similar ones. Narrow down by tag, folder or minimum score.",
        }),
      ),
    );
  }

  function settingsButton(label) {
    return node("button", { type: "button", class: "link-button", text: label, onclick: openSettings });
  }

  function retryButton() {
    return node("button", { type: "button", class: "link-button", text: "Try again", onclick: () => runSearch({ push: false }) });
  }

  function showError(kind, message, ...extra) {
    setStatus(kind === "input" ? "error" : kind, node("div", { class: "message" }, node("p", { text: message }), ...extra));
  }

  /** The message replaces the status line only: the previous results stay on the page. */
  function showSearchError(error) {
    if (error.kind === "unreachable") {
      showError(
        "unreachable",
        error.message,
        node(
          "p",
          { class: "hint" },
          "Check that the API is running (",
          node("code", { text: "python api.py" }),
          ") and that its address is right. ",
          settingsButton("Change the API address"),
          " · ",
          retryButton(),
        ),
      );
      markApiStatus("down", `API unreachable at ${apiBase()}`);
      return;
    }
    const hint =
      error.status === 401 || error.status === 403
        ? node("p", { class: "hint" }, settingsButton("Set the access token"))
        : null;
    showError("error", `The search failed: ${error.message}`, hint);
  }

  function clearResults() {
    el.resultsTitle.hidden = true;
    view.results = [];
    view.hasMore = false;
    el.grid.replaceChildren();
    el.pager.hidden = true;
  }

  function chip(label, value, onRemove) {
    return node(
      "span",
      { class: "chip" },
      node("span", { class: "chip-label", text: label }),
      node("span", { class: "chip-value", text: value }),
      node(
        "button",
        { type: "button", class: "chip-remove", "aria-label": `Remove ${label.toLowerCase()} ${value}`, onclick: onRemove },
        "×",
      ),
    );
  }

  function renderChips() {
    const chips = [];
    if (state.image) {
      chips.push(
        node(
          "span",
          { class: "chip chip-image" },
          node("img", { src: state.image, alt: `Query image ${state.imageName}` }),
          node("span", { class: "chip-label", text: "Image" }),
          node("span", { class: "chip-value", text: state.imageName }),
          node("button", { type: "button", class: "chip-remove", "aria-label": "Clear the query image", onclick: clearQuery }, "×"),
        ),
      );
    }
    if (state.similarTo) chips.push(similarChip());
    if (state.tag) chips.push(chip("Tag", state.tag, () => removeFilter(el.tag)));
    if (state.folder) chips.push(chip("Folder", state.folder, () => removeFilter(el.folder)));
    if (state.rawFilter) chips.push(chip("Filter", state.rawFilter, () => removeFilter(el.rawFilter)));
    if (state.takenFrom || state.takenTo) {
      chips.push(chip("Taken", `${state.takenFrom || "…"} – ${state.takenTo || "…"}`, () => removeFilter(el.takenFrom, el.takenTo)));
    }
    if (state.minScore !== null) chips.push(chip("Score ≥", String(state.minScore), () => removeFilter(el.minScore)));
    el.chips.replaceChildren(...chips);
  }

  function similarChip() {
    const picture = node("img", { alt: "", width: 28, height: 28 });
    setImageSource(picture, `/thumbnails/${encodeURIComponent(state.similarTo)}`);
    return node(
      "span",
      { class: "chip chip-image" },
      picture,
      node("span", { class: "chip-label", text: "Similar to" }),
      node("span", { class: "chip-value", text: state.similarName || state.similarTo }),
      node("button", { type: "button", class: "chip-remove", "aria-label": "Remove similar to", onclick: clearQuery }, "×"),
    );
  }

  /** An API image in an <img>: by URL (browser-cached), or fetched with the token when one is set. */
  function setImageSource(image, path) {
    if (!inlineImages()) {
      image.src = apiUrl(path);
      return;
    }
    apiFetch(path)
      .then((response) => response.blob())
      .then((blob) => {
        const url = URL.createObjectURL(blob);
        image.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
        image.src = url;
      })
      .catch(() => image.removeAttribute("src"));
  }

  function clearQuery() {
    Object.assign(state, { image: null, imageName: "", similarTo: null, similarName: "", page: 1 });
    runSearch({ push: true });
    el.query.focus();
  }

  function removeFilter(...inputs) {
    for (const input of inputs) input.value = "";
    optionsChanged();
  }

  function showResults(data) {
    const results = Array.isArray(data.results) ? data.results : [];
    view.results = results;
    view.hasMore = Boolean(data.has_more);
    rememberFacets(results);
    el.grid.replaceChildren(...results.map(resultCard));
    makeGridFocusable(0);
    renderPager(results.length);
    /* The API says which mode ranked: a query without text is ranked by vector in every mode, with a note. */
    const mode = data.mode || state.mode;
    showModeSwitch(mode);
    el.resultsTitle.textContent = resultsTitle();
    el.resultsTitle.hidden = false;
    if (!results.length) {
      showNoResults();
      return;
    }
    const first = (state.page - 1) * state.topK + 1;
    setStatus(
      "results",
      node("span", { class: "summary", text: `Results ${first}–${first + results.length - 1}${totalText(data)}` }),
      node("span", { class: "mode-badge", text: `${mode[0].toUpperCase()}${mode.slice(1)} search` }),
      ...(data.note ? [node("span", { class: "mode-note", text: data.note })] : []),
    );
  }

  function totalText(data) {
    const total = Number(data.total);
    if (data.total === null || data.total === undefined || !Number.isFinite(total)) return view.hasMore ? ", more on the next page" : "";
    return ` of ${data.total_exact ? "" : "about "}${total.toLocaleString()}`;
  }

  function resultsTitle() {
    if (state.query) return `Results for “${state.query}”`;
    if (state.similarTo) return `Images similar to ${state.similarName || state.similarTo}`;
    return `Images similar to ${state.imageName || "the query image"}`;
  }

  /** The switch shows the mode that ranked; the others are off while a query without words can't use them. */
  function showModeSwitch(ranked) {
    const differs = ranked !== state.mode;
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.checked = radio.value === ranked;
      radio.disabled = differs && radio.value !== ranked;
    }
    if (differs) {
      el.modeSwitch.dataset.ranked = ranked;
      el.modeSwitch.title = `Ranked by ${ranked}: ${state.mode} needs words in the query`;
    } else {
      delete el.modeSwitch.dataset.ranked;
      el.modeSwitch.removeAttribute("title");
    }
  }

  function showNoResults() {
    const what = state.query ? `“${state.query}”` : "this query";
    const hints = [];
    if (state.page > 1) hints.push("there are no more results after the previous page");
    if (state.minScore !== null) hints.push("lower or clear the minimum score");
    if (filterText()) hints.push("remove a filter");
    if (state.mode === "keyword" && state.query) hints.push("try vector or hybrid mode, which match by meaning");
    setStatus(
      "empty",
      node(
        "div",
        { class: "message" },
        node("p", { text: `No images match ${what}.` }),
        hints.length ? node("p", { class: "hint", text: `Try this: ${hints.join("; ")}.` }) : null,
      ),
    );
  }

  function renderPager(count) {
    const hasPrevious = state.page > 1;
    el.pager.hidden = !hasPrevious && !view.hasMore;
    el.prevPage.disabled = !hasPrevious;
    el.nextPage.disabled = !view.hasMore;
    el.pageInfo.textContent = count ? `Page ${state.page}` : "";
  }

  function rememberFacets(results) {
    for (const hit of results) {
      const metadata = hit.metadata || {};
      for (const tag of tagsOf(metadata)) known.tags.add(tag);
      if (metadata.folder) known.folders.add(metadata.folder);
    }
    fillDatalist(el.knownTags, known.tags);
    fillDatalist(el.knownFolders, known.folders);
  }

  function fillDatalist(list, values) {
    list.replaceChildren(...[...values].sort().slice(0, 300).map((value) => node("option", { value })));
  }

  function tagsOf(metadata) {
    const tags = metadata.tags;
    if (Array.isArray(tags)) return tags.map(String);
    if (typeof tags === "string" && tags) return tags.split(/[|,]/).map((tag) => tag.trim()).filter(Boolean);
    return [];
  }

  function fileName(hit) {
    const metadata = hit.metadata || {};
    return metadata.name || String(hit.path || hit.id).split("/").pop();
  }

  function altText(hit) {
    const metadata = hit.metadata || {};
    return metadata.description || `Image ${fileName(hit)}`;
  }

  function thumbnailSource(hit) {
    return hit.image || (hit.thumbnail_url ? apiUrl(hit.thumbnail_url) : "");
  }

  function formatScore(score) {
    const number = Number(score);
    return Number.isFinite(number) ? number.toFixed(3) : "–";
  }

  /** Width over height from the stored metadata; square until the photo itself says otherwise. */
  function aspectRatio(hit) {
    const metadata = hit.metadata || {};
    const ratio = Number(metadata.width) / Number(metadata.height);
    return Number.isFinite(ratio) && ratio > 0 ? Math.min(4, Math.max(0.25, ratio)) : 1;
  }

  function duplicateCount(hit) {
    return Array.isArray(hit.duplicates) ? hit.duplicates.length : 0;
  }

  /** A photo of the justified grid: its flex basis and growth follow its aspect ratio. */
  function resultCard(hit, index) {
    const duplicates = duplicateCount(hit);
    const ratio = aspectRatio(hit);
    const image = node("img", {
      alt: altText(hit),
      loading: "lazy",
      decoding: "async",
      width: Math.round(ratio * 200),
      height: 200,
    });
    image.src = thumbnailSource(hit);
    const button = node(
      "button",
      { type: "button", class: "card-button", tabindex: -1, onclick: () => openPreview(index) },
      image,
      takenElement(hit.metadata, false),
      duplicates
        ? node("span", {
            class: "dupes",
            title: `${duplicates} near-duplicate${duplicates > 1 ? "s" : ""} folded into this result: open to see them`,
            text: `+${duplicates}`,
          })
        : null,
    );
    if (hit.preview) button.style.backgroundImage = `url("${hit.preview}")`;
    return node(
      "li",
      {
        class: "card",
        style: `--ratio: ${ratio.toFixed(4)}`,
        "data-id": hit.id,
        "data-rank": hit.rank,
        "data-score": formatScore(hit.score),
        "data-path": hit.path,
        "data-name": fileName(hit),
      },
      button,
    );
  }

  // ---- keyboard in the grid: one Tab stop, arrow keys move -------------------------------------------

  function cardButtons() {
    return Array.from(el.grid.querySelectorAll(".card-button"));
  }

  function makeGridFocusable(index) {
    cardButtons().forEach((button, position) => button.setAttribute("tabindex", position === index ? "0" : "-1"));
  }

  function focusCard(index) {
    const buttons = cardButtons();
    const target = buttons[Math.max(0, Math.min(buttons.length - 1, index))];
    if (!target) return;
    makeGridFocusable(buttons.indexOf(target));
    target.focus();
  }

  /** The card in the row above or below whose centre is nearest to the current card's centre. */
  function verticalNeighbour(buttons, index, direction) {
    const from = buttons[index].getBoundingClientRect();
    const centre = from.left + from.width / 2;
    let best = index;
    let bestScore = Infinity;
    buttons.forEach((button, position) => {
      const box = button.getBoundingClientRect();
      const rowGap = direction > 0 ? box.top - from.bottom : from.top - box.bottom;
      if (rowGap < -1) return;
      const score = rowGap * 1000 + Math.abs(box.left + box.width / 2 - centre);
      if (score < bestScore) {
        best = position;
        bestScore = score;
      }
    });
    return best;
  }

  function onGridKey(event) {
    const buttons = cardButtons();
    const index = buttons.indexOf(document.activeElement);
    if (index < 0) return;
    const moves = {
      ArrowRight: () => index + 1,
      ArrowLeft: () => index - 1,
      ArrowDown: () => verticalNeighbour(buttons, index, 1),
      ArrowUp: () => verticalNeighbour(buttons, index, -1),
      Home: () => 0,
      End: () => buttons.length - 1,
    };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    focusCard(move());
  }

  // ---- preview dialog ------------------------------------------------------------------------------

  function formatBytes(bytes) {
    const number = Number(bytes);
    if (!Number.isFinite(number)) return String(bytes);
    const units = ["B", "KB", "MB", "GB"];
    let value = number;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
  }

  function formatTime(seconds) {
    const number = Number(seconds);
    return Number.isFinite(number) ? new Date(number * 1000).toLocaleString() : String(seconds);
  }

  /** A <time> of the date taken (the camera's local time, stored as if UTC), or null when unknown. */
  function takenElement(metadata, withTime) {
    const taken = Number((metadata || {}).taken);
    if (!(metadata && metadata.taken !== undefined && Number.isFinite(taken))) return null;
    const moment = new Date(taken * 1000);
    const options = withTime ? { timeZone: "UTC", dateStyle: "medium", timeStyle: "short" } : { timeZone: "UTC", dateStyle: "medium" };
    const offset = withTime && metadata.taken_offset ? ` (UTC${metadata.taken_offset})` : "";
    const iso = moment.toISOString().slice(0, 19) + (metadata.taken_offset || "");
    return node("time", { class: "card-taken", datetime: iso, text: moment.toLocaleString(undefined, options) + offset });
  }

  function exposureText(metadata) {
    const parts = [];
    const exposure = Number(metadata.exposure);
    if (Number.isFinite(exposure) && exposure > 0) parts.push(exposure < 1 ? `1/${Math.round(1 / exposure)} s` : `${exposure} s`);
    if (metadata.focal_length) parts.push(`${metadata.focal_length} mm`);
    if (metadata.iso) parts.push(`ISO ${metadata.iso}`);
    return parts.join(" · ");
  }

  function placeFacts(metadata) {
    const facts = [];
    const name = [metadata.place, metadata.region, metadata.country].filter(Boolean).filter((part, i, all) => all.indexOf(part) === i);
    const latitude = Number(metadata.latitude);
    const longitude = Number(metadata.longitude);
    const located = metadata.latitude !== undefined && Number.isFinite(latitude) && Number.isFinite(longitude);
    if (name.length) facts.push(fact("Place", name.join(", ")));
    if (located) {
      const map = `https://www.openstreetmap.org/?mlat=${latitude}&mlon=${longitude}#map=14/${latitude}/${longitude}`;
      const label = `${latitude.toFixed(5)}, ${longitude.toFixed(5)}`;
      facts.push(fact("Position", node("a", { class: "map-link", href: map, target: "_blank", rel: "noopener", text: `${label} (map)` })));
    }
    return facts;
  }

  function photoFacts(metadata) {
    const facts = [];
    const taken = takenElement(metadata, true);
    if (taken) facts.push(fact("Taken", taken));
    if (metadata.camera) facts.push(fact("Camera", String(metadata.camera)));
    if (metadata.lens) facts.push(fact("Lens", String(metadata.lens)));
    const exposure = exposureText(metadata);
    if (exposure) facts.push(fact("Exposure", exposure));
    return [...facts, ...placeFacts(metadata)];
  }

  function fact(label, ...value) {
    return [node("dt", { text: label }), node("dd", {}, ...value)];
  }

  function filterLink(label, onClick) {
    return node("button", { type: "button", class: "tag", title: `Filter by ${label}`, onclick: onClick, text: label });
  }

  function applyFilterFromPreview(input, value) {
    input.value = value;
    el.preview.close();
    optionsChanged();
  }

  /** What the engine knows about the match (file, score, ranks): behind the Details toggle. */
  function engineFactsOf(hit) {
    return [fact("File", fileName(hit)), fact("Path", node("code", { text: hit.path })), fact("Score", formatScore(hit.score)), fact("Rank", `#${hit.rank}`)].flat();
  }

  function factsOf(hit) {
    const metadata = hit.metadata || {};
    const facts = [...photoFacts(metadata)];
    if (metadata.width && metadata.height) facts.push(fact("Dimensions", `${metadata.width} × ${metadata.height}`));
    if (metadata.format) facts.push(fact("Format", String(metadata.format)));
    if (metadata.file_size !== undefined) facts.push(fact("File size", formatBytes(metadata.file_size)));
    if (metadata.modified !== undefined) facts.push(fact("Modified", formatTime(metadata.modified)));
    if (metadata.folder) facts.push(fact("Folder", filterLink(metadata.folder, () => applyFilterFromPreview(el.folder, metadata.folder))));
    const tags = tagsOf(metadata);
    if (tags.length) {
      facts.push(fact("Tags", node("span", { class: "tags" }, tags.map((tag) => filterLink(tag, () => applyFilterFromPreview(el.tag, tag))))));
    }
    const shown = new Set([...HIDDEN_FACTS, ...PHOTO_FACTS, ...PLACE_FACTS, "width", "height", "format", "file_size", "modified", "folder"]);
    for (const [key, value] of Object.entries(metadata)) {
      if (shown.has(key) || value === null || value === "" || typeof value === "object") continue;
      facts.push(fact(key.replace(/_/g, " "), String(value)));
    }
    return facts.flat();
  }

  function whyPanel(hit) {
    const why = hit.why;
    if (!why) return [];
    const value = (number, digits) => (number === null || number === undefined ? "–" : digits ? Number(number).toFixed(digits) : `#${number}`);
    const terms = Array.isArray(why.matched_terms) && why.matched_terms.length ? why.matched_terms.join(", ") : "none";
    return [
      node("h3", { text: "Ranking" }),
      node(
        "dl",
        { class: "facts" },
        fact("Vector rank", value(why.vector_rank)),
        fact("Vector score", value(why.vector_score, 3)),
        fact("Keyword rank", value(why.keyword_rank)),
        fact("Keyword score", value(why.keyword_score, 3)),
        fact("Matched terms", terms),
      ),
    ];
  }

  function releaseFullImage() {
    if (view.fullImageUrl) URL.revokeObjectURL(view.fullImageUrl);
    view.fullImageUrl = null;
  }

  /** Shows the thumbnail at once, then the original; with a token the original is fetched as a blob. */
  async function loadFullImage(hit, index) {
    releaseFullImage();
    const original = hit.image_url ? apiUrl(hit.image_url) : "";
    el.previewImage.src = thumbnailSource(hit);
    el.openOriginal.href = original || thumbnailSource(hit);
    if (!original) return;
    let source = original;
    if (tokenFor(apiBase())) {
      try {
        const blob = await (await apiFetch(hit.image_url)).blob();
        source = URL.createObjectURL(blob);
      } catch {
        return;
      }
      if (view.current !== index) {
        URL.revokeObjectURL(source);
        return;
      }
      view.fullImageUrl = source;
      el.openOriginal.href = source;
    }
    const loader = new Image();
    loader.onload = () => {
      if (view.current === index) el.previewImage.src = source;
    };
    loader.src = source;
  }

  /** The near-duplicates folded into a result, as a strip of thumbnails; one shows in the preview when chosen. */
  function renderDuplicates(hit) {
    const ids = Array.isArray(hit.duplicates) ? hit.duplicates : [];
    el.previewDuplicates.hidden = !ids.length;
    const items = ids.map((id, position) => {
      const picture = node("img", { alt: `Near-duplicate ${position + 1}`, loading: "lazy", width: 72, height: 72 });
      setImageSource(picture, `/thumbnails/${encodeURIComponent(id)}`);
      return node(
        "li",
        { "data-id": id },
        node("button", { type: "button", class: "duplicate-button", "aria-pressed": "false", onclick: () => showDuplicate(id) }, picture),
      );
    });
    el.duplicatesStrip.replaceChildren(...items);
  }

  function showDuplicate(id) {
    for (const button of el.duplicatesStrip.querySelectorAll(".duplicate-button")) {
      button.setAttribute("aria-pressed", String(button.closest("li").dataset.id === id));
    }
    hideHeat();
    el.preview.dataset.shown = id;
    releaseFullImage();
    setImageSource(el.previewImage, `/images/${encodeURIComponent(id)}`);
    el.openOriginal.href = apiUrl(`/images/${encodeURIComponent(id)}`);
  }

  // ---- where it matched: POST /explain, drawn over the photo ------------------------------------------

  function explainBody(id) {
    const body = { id, grid: EXPLAIN_GRID };
    if (state.query) body.query = state.query;
    else if (state.similarTo) body.similar_to = state.similarTo;
    else if (state.image) body.image = state.image;
    return body;
  }

  function hideHeat() {
    if (view.heatController) view.heatController.abort();
    view.heatController = null;
    el.heatOverlay.hidden = true;
    el.heatToggle.setAttribute("aria-pressed", "false");
    el.heatStatus.textContent = "";
  }

  async function toggleHeat() {
    if (el.heatToggle.getAttribute("aria-pressed") === "true") {
      hideHeat();
      return;
    }
    const hit = view.results[view.current];
    if (!hit) return;
    el.heatToggle.setAttribute("aria-pressed", "true");
    const body = explainBody(el.preview.dataset.shown || hit.id);
    const key = JSON.stringify(body);
    let heat = view.heat.get(key);
    if (!heat) {
      el.heatStatus.textContent = "Finding where it matched…";
      const controller = new AbortController();
      view.heatController = controller;
      try {
        const response = await apiFetch(
          "/explain",
          { method: "POST", headers: { "Content-Type": "application/json" }, body: key },
          controller.signal,
        );
        heat = await response.json();
      } catch (error) {
        if (error.name === "AbortError") return;
        el.heatStatus.textContent = `Cannot show where it matched: ${error.message}`;
        el.heatToggle.setAttribute("aria-pressed", "false");
        return;
      }
      view.heat.set(key, heat);
    }
    if (el.heatToggle.getAttribute("aria-pressed") !== "true") return;
    drawHeat(heat);
  }

  function drawHeat(heat) {
    const cells = heat.heat.flat().map((value) => node("span", { class: "heat-cell", style: `--heat: ${Number(value).toFixed(3)}` }));
    el.heatOverlay.style.setProperty("--grid", String(heat.grid));
    el.heatOverlay.dataset.heat = JSON.stringify(heat.heat);
    el.heatOverlay.replaceChildren(...cells);
    el.heatOverlay.hidden = false;
    placeHeatOverlay();
    el.heatStatus.textContent = "The clear areas match the query best; dimmed areas match less.";
  }

  /** The overlay covers the photo as drawn (object-fit: contain), not the whole frame. */
  function placeHeatOverlay() {
    const image = el.previewImage;
    if (el.heatOverlay.hidden || !image.naturalWidth) return;
    const frameWidth = image.clientWidth;
    const frameHeight = image.clientHeight;
    const scale = Math.min(frameWidth / image.naturalWidth, frameHeight / image.naturalHeight);
    const width = image.naturalWidth * scale;
    const height = image.naturalHeight * scale;
    Object.assign(el.heatOverlay.style, {
      left: `${(frameWidth - width) / 2}px`,
      top: `${(frameHeight - height) / 2}px`,
      width: `${width}px`,
      height: `${height}px`,
    });
  }

  function toggleDetails() {
    const open = el.detailsToggle.getAttribute("aria-expanded") !== "true";
    el.detailsToggle.setAttribute("aria-expanded", String(open));
    el.previewDetails.hidden = !open;
  }

  function openPreview(index) {
    const hit = view.results[index];
    if (!hit) return;
    if (!el.preview.open) lastFocus = document.activeElement;
    view.current = index;
    el.preview.dataset.id = hit.id;
    el.previewTitle.textContent = fileName(hit);
    el.previewImage.alt = altText(hit);
    el.previewPosition.textContent = `Result ${index + 1} of ${view.results.length} on this page`;
    const description = (hit.metadata || {}).description;
    el.previewDescription.textContent = description || "";
    el.previewDescription.hidden = !description;
    el.previewFacts.replaceChildren(...factsOf(hit));
    el.engineFacts.replaceChildren(...engineFactsOf(hit));
    delete el.preview.dataset.shown;
    hideHeat();
    renderDuplicates(hit);
    const why = whyPanel(hit);
    el.previewWhy.replaceChildren(...why);
    el.previewWhy.hidden = !why.length;
    el.previewPrev.disabled = index === 0;
    el.previewNext.disabled = index === view.results.length - 1;
    loadFullImage(hit, index);
    if (!el.preview.open) el.preview.showModal();
    el.previewClose.focus({ preventScroll: true });
  }

  function movePreview(step) {
    const next = view.current + step;
    if (next >= 0 && next < view.results.length) openPreview(next);
  }

  function onPreviewKey(event) {
    if (event.key === "ArrowRight") {
      event.preventDefault();
      movePreview(1);
    } else if (event.key === "ArrowLeft") {
      event.preventDefault();
      movePreview(-1);
    }
  }

  function onPreviewClosed() {
    const card = el.grid.querySelector(`.card[data-id="${CSS.escape(el.preview.dataset.id || "")}"] .card-button`);
    if (card) makeGridFocusable(cardButtons().indexOf(card));
    hideHeat();
    view.current = -1;
    releaseFullImage();
    el.previewImage.removeAttribute("src");
    (card || lastFocus || el.query).focus({ preventScroll: false });
  }

  function moreLikeThis() {
    const hit = view.results[view.current];
    if (!hit) return;
    el.preview.close();
    el.query.value = "";
    controlsToState();
    startNewSearch({ query: "", similarTo: hit.id, similarName: fileName(hit) });
  }

  // ---- settings and API status ----------------------------------------------------------------------

  function openSettings() {
    el.apiBaseInput.value = apiBase();
    el.apiTokenInput.value = tokenFor(apiBase());
    el.settingsResult.textContent = "";
    el.settings.showModal();
    el.apiBaseInput.focus();
  }

  function saveSettings(event) {
    const base = trimBase(el.apiBaseInput.value);
    if (!/^https?:\/\/[^\s/]+/i.test(base)) {
      event.preventDefault();
      el.settingsResult.textContent = "Enter an address starting with http:// or https://, e.g. http://localhost:8000";
      return;
    }
    store(STORAGE.base, base === defaultApiBase() ? "" : base);
    saveToken(base, el.apiTokenInput.value.trim());
    if (urlApiParam()) dropApiParam();
    checkApi();
    if (hasQuery()) runSearch({ push: false });
  }

  function dropApiParam() {
    const params = new URLSearchParams(window.location.search);
    params.delete("api");
    const search = params.toString();
    try {
      window.history.replaceState(null, "", `${window.location.pathname}${search ? `?${search}` : ""}`);
    } catch {
      /* history unavailable: the ?api parameter keeps priority until the address is edited */
    }
  }

  async function testSettings() {
    const base = trimBase(el.apiBaseInput.value);
    el.settingsResult.textContent = `Connecting to ${base}…`;
    const token = el.apiTokenInput.value.trim();
    try {
      const response = await fetch(`${base}/`, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
      if (!response.ok) throw new ApiError("http", await errorMessage(response), response.status);
      const info = await response.json();
      el.settingsResult.textContent = `Connected: ${describeApi(info)}.`;
    } catch (error) {
      el.settingsResult.textContent =
        error instanceof ApiError ? `The API answered with an error: ${error.message}` : `Cannot reach the API at ${base}.`;
    }
  }

  function describeApi(info) {
    const parts = [];
    if (Number.isFinite(Number(info.images))) parts.push(`${Number(info.images).toLocaleString()} images`);
    if (info.model) parts.push(String(info.model));
    return parts.join(" · ") || "ok";
  }

  function markApiStatus(stateName, text) {
    el.apiStatus.dataset.state = stateName;
    el.apiStatus.textContent = text;
  }

  // The request limits the server reports in GET / (max_top_k, max_query_chars, ...).
  function applyLimits(info) {
    const limit = Number(info.max_top_k);
    if (Number.isInteger(limit) && limit > 0) {
      maxTopK = Math.min(limit, MAX_TOP_K);
      el.topK.max = String(maxTopK);
    }
    const chars = Number(info.max_query_chars);
    if (Number.isInteger(chars) && chars > 0) el.query.maxLength = chars;
  }

  async function checkApi() {
    try {
      const info = await (await apiFetch("/")).json();
      applyLimits(info);
      markApiStatus("up", `Connected to ${apiBase()} · ${describeApi(info)}`);
    } catch (error) {
      const text =
        error.kind === "unreachable" ? `API unreachable at ${apiBase()}` : `API at ${apiBase()}: ${error.message}`;
      markApiStatus("down", text);
      if (!hasQuery() && error.kind === "unreachable") {
        showError(
          "unreachable",
          error.message,
          node("p", { class: "hint" }, "Start it with ", node("code", { text: "python api.py" }), " or ", settingsButton("change the API address"), "."),
        );
      }
    }
  }

  // ---- wiring ----------------------------------------------------------------------------------------

  function isTyping(target) {
    return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function onGlobalKey(event) {
    if (event.key === "/" && !isTyping(event.target) && !el.preview.open && !el.settings.open) {
      event.preventDefault();
      el.query.focus();
      el.query.select();
    }
  }

  function toggleFilters() {
    const open = el.filtersButton.getAttribute("aria-expanded") !== "true";
    el.filtersButton.setAttribute("aria-expanded", String(open));
    el.controls.classList.toggle("open", open);
  }

  /** The sticky header's height, for scroll-padding and scroll-margin in style.css. */
  function trackHeaderHeight() {
    const update = () => document.documentElement.style.setProperty("--header-height", `${el.topbar.offsetHeight}px`);
    update();
    if ("ResizeObserver" in window) new ResizeObserver(update).observe(el.topbar);
  }

  function bind() {
    el.form.addEventListener("submit", submitSearch);
    el.imageButton.addEventListener("click", () => el.fileInput.click());
    el.filtersButton.addEventListener("click", toggleFilters);
    el.grid.addEventListener("keydown", onGridKey);
    el.grid.addEventListener("focusin", (event) => {
      const index = cardButtons().indexOf(event.target);
      if (index >= 0) makeGridFocusable(index);
    });
    el.heatToggle.addEventListener("click", toggleHeat);
    el.detailsToggle.addEventListener("click", toggleDetails);
    el.previewImage.addEventListener("load", placeHeatOverlay);
    window.addEventListener("resize", placeHeatOverlay);
    el.fileInput.addEventListener("change", () => {
      searchWithFile(el.fileInput.files[0]);
      el.fileInput.value = "";
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", optionsChanged);
    for (const input of [el.topK, el.minScore, el.tag, el.folder, el.rawFilter, el.sort, el.takenFrom, el.takenTo]) {
      input.addEventListener("change", optionsChanged);
      input.addEventListener("keydown", (event) => {
        if (event.key === "Enter") {
          event.preventDefault();
          optionsChanged();
        }
      });
    }
    el.prevPage.addEventListener("click", () => goToPage(state.page - 1));
    el.nextPage.addEventListener("click", () => goToPage(state.page + 1));
    el.previewClose.addEventListener("click", () => el.preview.close());
    el.previewPrev.addEventListener("click", () => movePreview(-1));
    el.previewNext.addEventListener("click", () => movePreview(1));
    el.preview.addEventListener("keydown", onPreviewKey);
    el.preview.addEventListener("close", onPreviewClosed);
    el.preview.addEventListener("click", (event) => {
      if (event.target === el.preview) el.preview.close();
    });
    el.moreLikeThis.addEventListener("click", moreLikeThis);
    el.settingsButton.addEventListener("click", openSettings);
    el.settingsForm.addEventListener("submit", saveSettings);
    el.settingsCancel.addEventListener("click", () => el.settings.close());
    el.settingsTest.addEventListener("click", testSettings);
    document.addEventListener("dragenter", onDragEnter);
    document.addEventListener("dragover", onDragOver);
    document.addEventListener("dragleave", onDragLeave);
    document.addEventListener("drop", onDrop);
    document.addEventListener("paste", onPaste);
    document.addEventListener("keydown", onGlobalKey);
    window.addEventListener("popstate", () => {
      if (el.preview.open) el.preview.close();
      readStateFromUrl();
      stateToControls();
      runSearch({ push: false });
    });
  }

  function start() {
    adoptLegacyToken();
    takeTokenFromLink();
    bind();
    trackHeaderHeight();
    readStateFromUrl();
    stateToControls();
    checkApi();
    if (hasQuery()) runSearch({ push: false });
    else {
      renderChips();
      showWelcome();
    }
  }

  start();
})();
