/*
 * The card-preview page: patient picker, model inputs, hook firing and card rendering.
 *
 * Cards are drawn the way the CDS Hooks Sandbox shows them (cdshooks.md §5, §9.1): the summary as
 * the title, a colour bar for the indicator (info blue, warning orange, critical red), the source
 * label, the detail as Markdown, one button per suggestion (clicking it shows the draft resource
 * its "create" action would add, instead of writing anything) and the override reasons.
 *
 * Everything from the server is put into the page with textContent, except card details, which go
 * through EcglabMarkdown.render (escapes all HTML first). body[data-state] tells tests what the
 * page is doing: loading, ready, inputs-ready, firing, cards, no-cards, service-error, error.
 */
(function () {
  "use strict";

  var $ = function (id) {
    return document.getElementById(id);
  };
  var INDICATORS = { info: "Info", warning: "Warning", critical: "Critical" };
  var EXTENSION = "org.ecglab.prediction";
  var inputsRequest = 0; // drops answers to superseded patient choices

  function setState(state) {
    document.body.dataset.state = state;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function pretty(value) {
    return JSON.stringify(value, null, 2);
  }

  function showBanner(message) {
    var banner = $("banner");
    banner.textContent = message;
    banner.hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  /* ": <text>" of an OperationOutcome body (the service's own error format), else "". */
  function outcomeSuffix(body) {
    if (!body || body.resourceType !== "OperationOutcome") return "";
    var texts = (body.issue || [])
      .map(function (issue) {
        return (issue.details && issue.details.text) || issue.diagnostics;
      })
      .filter(Boolean);
    return texts.length ? ": " + texts.join(" — ") : "";
  }

  /* fetch → parsed JSON; throws Error(message) for non-2xx answers with the API's error text. */
  function api(path, options) {
    return fetch(path, options).then(
      function (response) {
        return response
          .json()
          .catch(function () {
            return null;
          })
          .then(function (body) {
            if (!response.ok) {
              var error = body && body.error ? body.error : { message: "HTTP " + response.status + outcomeSuffix(body) };
              var failure = new Error(error.message);
              failure.kind = error.kind || "http";
              throw failure;
            }
            return body;
          });
      },
      function () {
        var failure = new Error("The ecglab service does not answer; is `ecglab demo` still running?");
        failure.kind = "network";
        throw failure;
      }
    );
  }

  // -- patients -------------------------------------------------------------------------------------

  function loadPatients() {
    setState("loading");
    api("api/patients")
      .then(function (body) {
        $("fhir-server").textContent = body.fhirServer;
        var select = $("patient");
        select.textContent = "";
        if (!body.patients.length) {
          select.appendChild(el("option", "", "No patients on the FHIR server — run ecglab seed-fhir"));
          setState("error");
          showBanner("The FHIR server holds no patients. Seed it with `ecglab seed-fhir`.");
          return;
        }
        select.appendChild(el("option", "", "— choose a patient —")).value = "";
        body.patients.forEach(function (p) {
          var details = [p.gender, p.birthDate ? "born " + p.birthDate : null].filter(Boolean).join(", ");
          var option = el("option", "", p.name + (details ? " (" + details + ")" : "") + " · " + p.id);
          option.value = p.id;
          select.appendChild(option);
        });
        select.disabled = false;
        setState("ready");
      })
      .catch(function (error) {
        $("patient").textContent = "";
        $("patient").appendChild(el("option", "", "Patients unavailable"));
        showBanner("Cannot list patients: " + error.message);
        setState("error");
      });
  }

  // -- inputs ---------------------------------------------------------------------------------------

  function resetInputs(message) {
    $("inputs-state").textContent = message;
    $("inputs-state").hidden = false;
    $("ecg-block").hidden = true;
    $("ecg-problem").hidden = true;
    $("features").hidden = true;
  }

  function loadInputs(patientId) {
    var ticket = ++inputsRequest;
    resetInputs("Reading the patient's data from the FHIR server…");
    setState("loading-inputs");
    api("api/patients/" + encodeURIComponent(patientId) + "/inputs")
      .then(function (body) {
        if (ticket !== inputsRequest) return;
        renderInputs(body);
        setState("inputs-ready");
      })
      .catch(function (error) {
        if (ticket !== inputsRequest) return;
        resetInputs("The inputs could not be read.");
        showBanner("Cannot read the patient's inputs: " + error.message);
        setState("error");
      });
  }

  function renderInputs(body) {
    $("inputs-state").hidden = true;
    var problem = $("ecg-problem");
    if (body.ecgProblem) {
      problem.textContent = body.ecgProblem.message + " The service will answer with no cards.";
      problem.dataset.kind = body.ecgProblem.kind;
      problem.hidden = false;
    } else {
      problem.hidden = true;
    }
    if (body.ecg && body.ecg.signals) {
      var ecg = body.ecg;
      $("ecg-meta").textContent =
        "ECG " + ecg.reference + " (" + ecg.carrier + "), recorded " + ecg.recordedAt +
        "; source " + ecg.sourceLeads.length + " leads at " + ecg.sourceFs + " Hz, " +
        ecg.sourceSamples + " samples; shown: " + ecg.signals[0].length + " points per lead.";
      $("ecg-block").hidden = false;
      window.EcglabEcgPlot.draw($("ecg"), ecg);
    } else {
      $("ecg-block").hidden = true;
    }
    var tbody = $("features").querySelector("tbody");
    tbody.textContent = "";
    body.features.forEach(function (f) {
      var row = el("tr", f.missing ? "missing" : "");
      row.dataset.key = f.key;
      row.appendChild(el("th", "", f.display)).scope = "row";
      row.appendChild(el("td", "value", f.missing ? "missing, imputed" : f.shown + (f.unit ? " " + f.unit : "")));
      row.appendChild(el("td", "source", f.source || "—"));
      tbody.appendChild(row);
    });
    $("features").hidden = false;
  }

  // -- firing ---------------------------------------------------------------------------------------

  function fire() {
    var patientId = $("patient").value;
    var hook = $("hook").value;
    if (!patientId) {
      showBanner("Choose a patient first.");
      return;
    }
    hideBanner();
    $("fire").disabled = true;
    setState("firing");
    var cards = $("cards");
    cards.textContent = "";
    cards.appendChild(el("p", "muted", "Calling the " + hook + " service…"));
    $("cards-meta").textContent = "";
    api("api/fire", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ patient: patientId, hook: hook }),
    })
      .then(function (result) {
        renderExchange(result);
        renderResult(result);
      })
      .catch(function (error) {
        cards.textContent = "";
        var box = el("div", "service-error");
        box.appendChild(el("strong", "", "The hook could not be fired."));
        box.appendChild(el("p", "", error.message));
        cards.appendChild(box);
        showBanner(error.message);
        setState("error");
      })
      .then(function () {
        $("fire").disabled = false;
      });
  }

  function renderExchange(result) {
    $("request-json").textContent = pretty(result.request);
    $("response-json").textContent = pretty(result.response);
    $("request-box").hidden = false;
    $("response-box").hidden = false;
  }

  function renderResult(result) {
    var cards = $("cards");
    cards.textContent = "";
    $("cards-meta").textContent =
      "· " + result.serviceId + " · HTTP " + result.status + " · " + Math.round(result.elapsedMs) + " ms";
    if (result.status !== 200) {
      var box = el("div", "service-error");
      box.appendChild(el("strong", "", "The service answered HTTP " + result.status + "."));
      box.appendChild(el("p", "outcome", result.outcomeText || "(no OperationOutcome text)"));
      cards.appendChild(box);
      setState("service-error");
      return;
    }
    var list = (result.response && result.response.cards) || [];
    if (!list.length) {
      var none = el("div", "no-cards");
      none.appendChild(el("strong", "", "No cards."));
      none.appendChild(
        el(
          "p",
          "",
          "The service has no recommendation for this patient and hook (no lab predicted abnormal above " +
            "its threshold, no usable ECG, or the test is already ordered or recently resulted)."
        )
      );
      cards.appendChild(none);
      setState("no-cards");
      return;
    }
    list.forEach(function (card) {
      cards.appendChild(renderCard(card));
    });
    setState("cards");
  }

  // -- one card -------------------------------------------------------------------------------------

  function renderCard(card) {
    var indicator = INDICATORS[card.indicator] ? card.indicator : "info";
    var article = el("article", "card indicator-" + indicator);
    article.dataset.indicator = indicator;
    var body = el("div", "card-body");
    article.appendChild(body);

    var head = el("div", "card-head");
    head.appendChild(el("h3", "card-summary", card.summary));
    head.appendChild(el("span", "card-indicator", INDICATORS[indicator]));
    body.appendChild(head);

    var source = card.source || {};
    var sourceLine = el("p", "card-source", "Source: ");
    if (source.url) {
      var a = el("a", "", source.label || source.url);
      a.href = source.url;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      sourceLine.appendChild(a);
    } else {
      sourceLine.appendChild(document.createTextNode(source.label || "(no source label)"));
    }
    if (source.topic && source.topic.display) {
      sourceLine.appendChild(el("span", "card-topic", source.topic.display));
    }
    body.appendChild(sourceLine);

    var facts = card.extension && card.extension[EXTENSION];
    if (facts && typeof facts.probability === "number") {
      var horizons = (facts.horizons || []).map(function (h) {
        return h === 0 ? "now" : "≤ " + h + " min";
      });
      body.appendChild(
        el(
          "p",
          "card-facts",
          "Probability " + facts.probability.toFixed(2) +
            (typeof facts.decisionThreshold === "number" ? " (threshold " + facts.decisionThreshold.toFixed(2) + ")" : "") +
            (horizons.length ? " · " + horizons.join(", ") : "") +
            (facts.syntheticModel ? " · synthetic demo model" : "")
        )
      );
    }

    if (card.detail) {
      var detail = el("div", "card-detail markdown");
      detail.innerHTML = window.EcglabMarkdown.render(card.detail); // escaped by the renderer
      body.appendChild(detail);
    }

    var suggestions = card.suggestions || [];
    if (suggestions.length) {
      var row = el("div", "card-suggestions");
      var preview = el("div", "suggestion-preview");
      preview.hidden = true;
      suggestions.forEach(function (suggestion) {
        var button = el("button", "suggestion" + (suggestion.isRecommended ? " recommended" : ""), suggestion.label);
        button.type = "button";
        button.addEventListener("click", function () {
          showSuggestion(preview, suggestion, button);
        });
        row.appendChild(button);
      });
      body.appendChild(row);
      body.appendChild(preview);
    }

    (card.links || []).forEach(function (link) {
      var a = el("a", "card-link", link.label);
      if (/^https?:/i.test(link.url || "")) {
        a.href = link.url;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
      }
      body.appendChild(a);
    });

    var reasons = card.overrideReasons || [];
    if (reasons.length) {
      var override = el("div", "override-reasons");
      override.appendChild(el("span", "override-title", "Dismiss with a reason:"));
      var ul = el("ul");
      reasons.forEach(function (reason) {
        var li = el("li", "", reason.display || reason.code);
        li.title = (reason.system || "") + "|" + (reason.code || "");
        ul.appendChild(li);
      });
      override.appendChild(ul);
      body.appendChild(override);
    }
    return article;
  }

  function showSuggestion(preview, suggestion, button) {
    var wasOpen = !preview.hidden && preview.dataset.for === suggestion.label;
    preview.textContent = "";
    preview.dataset.for = suggestion.label;
    if (wasOpen) {
      preview.hidden = true;
      button.setAttribute("aria-expanded", "false");
      return;
    }
    (suggestion.actions || []).forEach(function (action) {
      var verb = { create: "create", update: "update", delete: "delete" }[action.type] || action.type;
      preview.appendChild(
        el("p", "action-description", "Accepting would " + verb + ": " + (action.description || "(no description)"))
      );
      if (action.resource) {
        preview.appendChild(el("pre", "suggestion-resource", pretty(action.resource)));
      } else if (action.resourceId) {
        preview.appendChild(el("pre", "suggestion-resource", action.resourceId));
      }
    });
    preview.appendChild(el("p", "muted", "Preview only: nothing is written to the FHIR server."));
    preview.hidden = false;
    button.setAttribute("aria-expanded", "true");
  }

  // -- wiring ---------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", function () {
    $("patient").addEventListener("change", function () {
      var id = $("patient").value;
      $("fire").disabled = !id;
      hideBanner();
      if (id) loadInputs(id);
      else resetInputs("Pick a patient.");
    });
    $("fire").addEventListener("click", fire);
    loadPatients();
  });
})();
