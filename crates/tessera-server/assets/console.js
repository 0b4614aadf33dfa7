// The console's own script (served from /assets, as the Content-Security-Policy requires):
// the upload progress of the sync response file.
htmx.on('htmx:xhr:progress', function (evt) {
  var bar = document.getElementById('upload-progress');
  if (bar && evt.detail.lengthComputable) {
    bar.value = (evt.detail.loaded / evt.detail.total) * 100;
  }
});
