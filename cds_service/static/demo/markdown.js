/*
 * A small Markdown renderer for CDS Hooks card details (GitHub-flavoured subset).
 *
 * Blocks: ATX headings, paragraphs (hard breaks with two trailing spaces or a backslash),
 * bullet and numbered lists (nested by indentation), fenced code, block quotes, horizontal rules
 * and GFM pipe tables (the service's cards carry one). Inline: code spans, **bold**, *italic*,
 * _italic_, ~~strike~~, [links](url) and <https://autolinks>.
 *
 * Safety first: card text comes from a service, so ALL source text is HTML-escaped before any
 * markup is added; raw HTML in the Markdown is shown as text, never interpreted. Links keep only
 * http(s), mailto and relative URLs (javascript:, data: and others become plain text) and open in
 * a new tab with rel="noopener noreferrer". The page's Content-Security-Policy backs this up.
 *
 * API: EcglabMarkdown.render(source) -> HTML string; EcglabMarkdown.escapeHtml(text).
 */
(function (global) {
  "use strict";

  var HOLE = "\u0000"; // placeholder delimiter; stripped from the input first

  function escapeHtml(text) {
    return String(text)
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  function safeUrl(url) {
    var trimmed = String(url).trim();
    var scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(trimmed);
    if (!scheme) return trimmed; // relative (path, query or fragment)
    var name = scheme[1].toLowerCase();
    return name === "http" || name === "https" || name === "mailto" ? trimmed : null;
  }

  function link(text, url, holes) {
    var safe = safeUrl(url);
    if (safe === null) return text;
    holes.push(
      '<a href="' + escapeHtml(safe) + '" target="_blank" rel="noopener noreferrer">' + text + "</a>"
    );
    return HOLE + (holes.length - 1) + HOLE;
  }

  function unescapeEntities(text) {
    return text
      .replace(/&lt;/g, "<")
      .replace(/&gt;/g, ">")
      .replace(/&quot;/g, '"')
      .replace(/&#39;/g, "'")
      .replace(/&amp;/g, "&");
  }

  /* Inline Markdown → HTML. Code spans and links become placeholders so that emphasis rules
   * never reach inside them; every other character is escaped before markup is added. */
  function inline(source) {
    var holes = [];
    var text = String(source).replace(/\u0000/g, "");
    // 1. code spans (from the raw source, content escaped)
    text = text.replace(/(`+)([\s\S]*?[^`])\1(?!`)/g, function (_, ticks, code) {
      holes.push("<code>" + escapeHtml(code.replace(/^ (.*) $/, "$1")) + "</code>");
      return HOLE + (holes.length - 1) + HOLE;
    });
    // 2. escape everything else
    text = escapeHtml(text);
    // 3. links [text](url "title") and autolinks <https://...>
    text = text.replace(/\[([^\]]+)\]\(\s*([^\s()]+)(?:\s+&quot;[^&]*&quot;)?\s*\)/g, function (_, label, url) {
      return link(emphasis(label), unescapeEntities(url), holes);
    });
    text = text.replace(/&lt;((?:https?:\/\/|mailto:)[^\s&]+)&gt;/g, function (_, url) {
      return link(url, unescapeEntities(url), holes);
    });
    // 4. emphasis, then hard line breaks
    text = emphasis(text);
    text = text.replace(/(?: {2,}|\\)\n/g, "<br>\n");
    // 5. put code spans and links back
    for (var pass = 0; pass < 2; pass++) {
      text = text.replace(/\u0000(\d+)\u0000/g, function (_, index) {
        return holes[Number(index)];
      });
    }
    return text;
  }

  function emphasis(text) {
    return text
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
      .replace(/(^|[^*\w])\*(?=[^\s*])([\s\S]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
  }

  // -- blocks ---------------------------------------------------------------------------------------

  var FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)\s*$/;
  var HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
  var RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  var QUOTE = /^ {0,3}>\s?(.*)$/;
  var ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  var TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function isBlank(line) {
    return /^\s*$/.test(line);
  }

  function indentOf(line) {
    var spaces = /^\s*/.exec(line)[0];
    return spaces.replace(/\t/g, "    ").length;
  }

  function splitRow(line) {
    var row = line.trim();
    if (row.charAt(0) === "|") row = row.slice(1);
    if (row.charAt(row.length - 1) === "|" && row.charAt(row.length - 2) !== "\\") row = row.slice(0, -1);
    return row.split(/(?<!\\)\|/).map(function (cell) {
      return cell.trim().replace(/\\\|/g, "|");
    });
  }

  function startsBlock(lines, i) {
    var line = lines[i];
    return (
      FENCE.test(line) ||
      HEADING.test(line) ||
      RULE.test(line) ||
      QUOTE.test(line) ||
      ITEM.test(line) ||
      (line.indexOf("|") >= 0 && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]))
    );
  }

  function renderTable(lines, i, out) {
    var header = splitRow(lines[i]);
    var aligns = splitRow(lines[i + 1]).map(function (cell) {
      var left = cell.charAt(0) === ":";
      var right = cell.charAt(cell.length - 1) === ":";
      return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    function cells(row, tag) {
      return header
        .map(function (_, k) {
          var align = aligns[k] ? ' class="align-' + aligns[k] + '"' : "";
          return "<" + tag + align + ">" + inline(row[k] || "") + "</" + tag + ">";
        })
        .join("");
    }
    var html = "<table><thead><tr>" + cells(header, "th") + "</tr></thead><tbody>";
    i += 2;
    while (i < lines.length && !isBlank(lines[i]) && lines[i].indexOf("|") >= 0) {
      html += "<tr>" + cells(splitRow(lines[i]), "td") + "</tr>";
      i++;
    }
    out.push(html + "</tbody></table>");
    return i;
  }

  /* A list starting at line i: items at the first item's indentation; deeper lines (nested
   * lists, continuation text) belong to the item above them. */
  function renderList(lines, i, out) {
    var first = ITEM.exec(lines[i]);
    var base = first[1].replace(/\t/g, "    ").length;
    var ordered = /\d/.test(first[2]);
    var start = ordered ? parseInt(first[2], 10) : 1;
    var items = [];
    while (i < lines.length) {
      var line = lines[i];
      var match = ITEM.exec(line);
      if (match && indentOf(line) === base && /\d/.test(match[2]) === ordered) {
        items.push([match[3]]);
        i++;
        continue;
      }
      if (isBlank(line)) {
        var next = i + 1 < lines.length ? lines[i + 1] : "";
        if (!isBlank(next) && (indentOf(next) > base || (ITEM.test(next) && indentOf(next) === base))) {
          items[items.length - 1].push("");
          i++;
          continue;
        }
        break;
      }
      if (indentOf(line) > base || (!match && !startsBlock(lines, i))) {
        items[items.length - 1].push(line.slice(Math.min(indentOf(line), base + 2)));
        i++;
        continue;
      }
      break;
    }
    var tag = ordered ? "ol" : "ul";
    var open = ordered && start !== 1 ? "<ol start=\"" + start + "\">" : "<" + tag + ">";
    var html = items
      .map(function (body) {
        var inner = blocks(body);
        // a tight item is one paragraph: drop its <p> so it reads like the Sandbox
        var tight = /^<p>([\s\S]*?)<\/p>/.exec(inner);
        if (tight && inner.indexOf("<p>", 3) < 0) inner = tight[1] + inner.slice(tight[0].length);
        return "<li>" + inner + "</li>";
      })
      .join("");
    out.push(open + html + "</" + tag + ">");
    return i;
  }

  function blocks(lines) {
    var out = [];
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      var match;
      if (isBlank(line)) {
        i++;
      } else if ((match = FENCE.exec(line))) {
        var fence = match[1];
        var code = [];
        i++;
        while (i < lines.length && lines[i].trim().indexOf(fence) !== 0) code.push(lines[i++]);
        i++; // closing fence (or end of text)
        var lang = match[2] ? ' class="language-' + escapeHtml(match[2]) + '"' : "";
        out.push("<pre><code" + lang + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
      } else if ((match = HEADING.exec(line))) {
        var level = match[1].length;
        out.push("<h" + level + ">" + inline(match[2] || "") + "</h" + level + ">");
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (line.indexOf("|") >= 0 && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
        i = renderTable(lines, i, out);
      } else if (QUOTE.test(line)) {
        var quoted = [];
        while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
          quoted.push(match[1]);
          i++;
        }
        out.push("<blockquote>" + blocks(quoted) + "</blockquote>");
      } else if (ITEM.test(line)) {
        i = renderList(lines, i, out);
      } else {
        var para = [line.replace(/^\s+/, "")];
        i++;
        while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines, i)) {
          para.push(lines[i].replace(/^\s+/, ""));
          i++;
        }
        out.push("<p>" + inline(para.join("\n")) + "</p>");
      }
    }
    return out.join("\n");
  }

  function render(source) {
    if (source === null || source === undefined) return "";
    var text = String(source).replace(/\r\n?/g, "\n").replace(/\u0000/g, "");
    return blocks(text.split("\n"));
  }

  global.EcglabMarkdown = { render: render, escapeHtml: escapeHtml };
})(window);
