// Drive OpenClaw's bundle-MCP runtime without a model (run with Node >= 24).
//
// Loads OpenClaw's configuration the way the gateway does, then asks the runtime an embedded
// agent turn uses (createBundleMcpToolRuntime) to start the MCP servers of the enabled
// bundles and materialize their tools. Prints one JSON line per step:
//   {"tools": {name: parameters}}               what the model would be offered
//   {"call": name, "result": {...}}             each call from argv: NAME JSON_ARGS ...
// Usage: node openclaw_driver.mjs OPENCLAW_PACKAGE_DIR WORKSPACE_DIR [NAME ARGS_JSON]...
const [pkg, workspaceDir, ...calls] = process.argv.slice(2);
const dist = `${pkg}/dist`;
const { loadConfig } = await import(`${dist}/config/config.js`);
const { createBundleMcpToolRuntime } = await import(`${dist}/agents/agent-bundle-mcp-materialize.js`);
const cfg = loadConfig();
const runtime = await createBundleMcpToolRuntime({ workspaceDir, cfg });
try {
  const tools = Object.fromEntries(runtime.tools.map((t) => [t.name, t.parameters]));
  console.log(JSON.stringify({ tools }));
  for (let i = 0; i + 1 < calls.length; i += 2) {
    const tool = runtime.tools.find((t) => t.name === calls[i]);
    if (!tool) {
      console.log(JSON.stringify({ call: calls[i], error: "no such tool" }));
      continue;
    }
    const result = await tool.execute(`call-${i}`, JSON.parse(calls[i + 1]), undefined, undefined);
    console.log(JSON.stringify({ call: calls[i], result }));
  }
} finally {
  await runtime.dispose();
}
