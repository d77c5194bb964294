// The console's first screen: who this gateway is and how it is doing, refreshed every 5 s.
const $ = (id) => document.getElementById(id);

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  return (d ? `${d}d ` : "") + (d || h ? `${h}h ` : "") + `${m}m ${s}s`;
}

async function refresh() {
  try {
    const res = await fetch("/api/gateway", { headers: { accept: "application/json" } });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const g = await res.json();
    $("gateway-id").textContent = g.gateway_id;
    $("public-key").textContent = g.public_key;
    $("version").textContent = g.version;
    $("region").textContent = g.region;
    $("started-at").textContent = g.started_at;
    $("uptime").textContent = duration(g.uptime_seconds);
    $("machines").textContent = String(g.machines);
    $("status").textContent = "online";
    $("status").className = "pill ok";
  } catch (e) {
    $("status").textContent = `unreachable (${e.message})`;
    $("status").className = "pill bad";
  }
}

refresh();
setInterval(refresh, 5000);
