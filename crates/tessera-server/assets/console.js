// The console's own script (served from /assets, as the Content-Security-Policy requires):
// the upload progress of the sync response file, and the times shown in UTC or in the
// browser's time zone. Every time is a <time datetime="RFC 3339, UTC"> whose text is the UTC
// time; the choice is kept in the browser (localStorage), the pages work without it.
(function () {
  if (window.htmx) {
    htmx.on('htmx:xhr:progress', function (evt) {
      var bar = document.getElementById('upload-progress');
      if (bar && evt.detail.lengthComputable) {
        bar.value = (evt.detail.loaded / evt.detail.total) * 100;
      }
    });
  }

  var KEY = 'tessera-times';

  function local() {
    try {
      return window.localStorage.getItem(KEY) === 'local';
    } catch (e) {
      return false;
    }
  }

  function two(n) {
    return (n < 10 ? '0' : '') + n;
  }

  function zoneName(date) {
    try {
      var parts = new Intl.DateTimeFormat(undefined, { timeZoneName: 'short' }).formatToParts(date);
      for (var i = 0; i < parts.length; i++) {
        if (parts[i].type === 'timeZoneName') return parts[i].value;
      }
    } catch (e) {}
    var offset = -date.getTimezoneOffset();
    return 'UTC' + (offset < 0 ? '-' : '+') + two(Math.floor(Math.abs(offset) / 60)) + ':' + two(Math.abs(offset) % 60);
  }

  function localText(date) {
    return date.getFullYear() + '-' + two(date.getMonth() + 1) + '-' + two(date.getDate()) + ' ' +
      two(date.getHours()) + ':' + two(date.getMinutes()) + ':' + two(date.getSeconds()) + ' ' + zoneName(date);
  }

  function apply() {
    var toLocal = local();
    var times = document.querySelectorAll('time[datetime]');
    for (var i = 0; i < times.length; i++) {
      var el = times[i];
      if (!el.hasAttribute('data-utc')) el.setAttribute('data-utc', el.textContent);
      var date = new Date(el.getAttribute('datetime'));
      if (toLocal && !isNaN(date.getTime())) {
        el.textContent = localText(date);
        el.title = el.getAttribute('data-utc');
      } else {
        el.textContent = el.getAttribute('data-utc');
        el.removeAttribute('title');
      }
    }
    var button = document.getElementById('tz-toggle');
    if (button) button.textContent = toLocal ? 'Times: local (' + zoneName(new Date()) + ')' : 'Times: UTC';
  }

  document.addEventListener('DOMContentLoaded', function () {
    var button = document.getElementById('tz-toggle');
    if (button) {
      button.addEventListener('click', function () {
        try {
          window.localStorage.setItem(KEY, local() ? 'utc' : 'local');
        } catch (e) {}
        apply();
      });
    }
    apply();
  });
  document.addEventListener('htmx:afterSwap', apply);
  if (document.readyState !== 'loading') apply();
})();
