-- A headless Neovim session against `editkv lsp` (run by tests/lsp_server/test_neovim.py).
-- Works with Neovim 0.7 (Debian 12) and later: vim.lsp.start_client + buf_attach_client.
-- EDITKV_CMD (JSON list): the server command; EDITKV_FILE: the file to edit;
-- EDITKV_OUT: where to write what the LSP client got, as JSON.
local out_path = os.getenv("EDITKV_OUT")
local result = { messages = {}, progress = {} }

local function finish(err)
  result.error = err
  local f = assert(io.open(out_path, "w"))
  f:write(vim.fn.json_encode(result))
  f:close()
  vim.cmd("qall!")
end

local function first_result(responses, client_id)
  local r = responses and responses[client_id]
  if r == nil then return nil end
  if r.err ~= nil or r.error ~= nil then return { error = r.err or r.error } end
  return r.result
end

local ok, err = pcall(function()
  vim.cmd("filetype on")
  vim.cmd("edit " .. vim.fn.fnameescape(os.getenv("EDITKV_FILE")))
  local buf = vim.api.nvim_get_current_buf()
  local client_id = vim.lsp.start_client({
    name = "editkv",
    cmd = vim.fn.json_decode(os.getenv("EDITKV_CMD")),
    root_dir = vim.fn.getcwd(),
    init_options = { debounceMs = 0, numDrafts = 2, statsFile = false, maxTokens = 6 },
    handlers = {
      ["window/showMessage"] = function(_, res) table.insert(result.messages, res.message) end,
      ["$/progress"] = function(_, res) table.insert(result.progress, res.value.kind) end,
    },
  })
  assert(client_id, "vim.lsp.start_client failed")
  vim.lsp.buf_attach_client(buf, client_id)
  assert(vim.wait(30000, function()
    local c = vim.lsp.get_client_by_id(client_id)
    return c ~= nil and c.initialized
  end, 20), "the server did not initialize")
  local stats
  assert(vim.wait(120000, function()
    stats = first_result(vim.lsp.buf_request_sync(buf, "editkv/stats", vim.NIL, 5000), client_id)
    return stats ~= nil and stats.backend ~= nil and stats.backend.ready
  end, 50), "the model did not load")
  result.backend = stats.backend.description
  result.encoding = vim.lsp.get_client_by_id(client_id).offset_encoding

  -- edit: two new lines at the end, then keystrokes on the last one (incremental didChange)
  local n = vim.api.nvim_buf_line_count(buf)
  vim.api.nvim_buf_set_lines(buf, n, n, false, { "def total(items):", "    return " })
  for i, ch in ipairs({ "s", "u", "m" }) do
    vim.api.nvim_buf_set_text(buf, n + 1, 10 + i, n + 1, 10 + i, { ch })
  end
  vim.api.nvim_buf_set_text(buf, n + 1, 12, n + 1, 14, { "" })  -- delete "um": "    return s"
  vim.api.nvim_buf_set_text(buf, n + 1, 12, n + 1, 12, { "um" })
  result.line = vim.api.nvim_buf_get_lines(buf, n + 1, n + 2, false)[1]
  result.cursor = { n + 1, 14 }
  -- the cursor after the "m", as in insert mode (normal mode can't sit past the last character)
  local params = { textDocument = { uri = vim.uri_from_bufnr(buf) }, position = { line = n + 1, character = 14 } }
  result.completion = first_result(vim.lsp.buf_request_sync(buf, "textDocument/completion", params, 60000), client_id)
  params.context = { triggerKind = 1 }
  result.inline = first_result(vim.lsp.buf_request_sync(buf, "textDocument/inlineCompletion", params, 60000), client_id)
  result.stats = first_result(vim.lsp.buf_request_sync(buf, "editkv/stats", vim.NIL, 5000), client_id)
  vim.lsp.stop_client(client_id)
  vim.wait(5000, function() return vim.lsp.get_client_by_id(client_id) == nil end, 20)
end)
finish(ok and vim.NIL or tostring(err))
